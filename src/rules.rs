//! Cutting rules: everything that decides which file a record lands in, what the file is called
//! and where it is cut — the routing settings, the file size cap and the version of the routing
//! code. A replay must cut with the rules its batch was first cut with, or its objects would not
//! be the interrupted upload's (duplicates beside them, or a shared key with fewer records).
//!
//! Rules are content-addressed: stored once in the bucket as
//! `segment-logs/_manifests/_rules/{hash}.json` (before the first intent that names them), and an
//! intent carries only the hash. A member that meets an intent cut under other rules fetches
//! them and replays with them, or — when its code cannot reproduce them (another routing-code
//! version, settings it does not know) — holds the partition and says why instead of guessing.

use serde::{Deserialize, Serialize};

use crate::config::{Config, RoutingConfig};
use crate::layout;
use crate::layout::Codec;

/// Version of what `route.rs` makes of a record. Bump it with any change there that routes some
/// record to another file or writes another line for it, keeping the earlier behaviour for
/// routers of earlier versions: a replay must be cut by the code that cut the interrupted batch.
/// 2: a duplicated routing field is a `duplicate-key` dead letter (1 took the first), and a
/// `too-large` dead letter keeps a prefix and a hash of the payload (1 kept all of it).
pub const ROUTING_CODE_VERSION: u32 = 2;

/// The earliest routing code this release still routes as (`route::Router::with_code`): a
/// member replays a batch any release since began.
pub const OLDEST_ROUTING_CODE: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CuttingRules {
    /// [`ROUTING_CODE_VERSION`] of the code that cut with these rules.
    pub routing_code: u32,
    pub routing: RoutingConfig,
    /// `buffer.max_file_bytes`: where files are cut.
    pub max_file_bytes: u64,
    /// `output.compression`: what object keys end with. Left out for gzip, so the rules (and
    /// their hash) of releases before zstd objects stay what they were.
    #[serde(default, skip_serializing_if = "Codec::is_gzip")]
    pub compression: Codec,
    /// The hash of the suppression list whose users' events are left out
    /// ([`crate::suppress`]), stored in the bucket before these rules. Left out when there is
    /// none, so the rules (and their hash) of members without one stay what they were; a
    /// release before suppression refuses rules naming one (`deny_unknown_fields`) and holds
    /// the partition rather than archive those events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppression: Option<String>,
}

impl CuttingRules {
    /// The rules this member cuts new batches with.
    pub fn of(config: &Config) -> CuttingRules {
        CuttingRules {
            routing_code: ROUTING_CODE_VERSION,
            routing: config.routing.clone(),
            max_file_bytes: config.buffer.max_file_bytes,
            compression: config.output.compression,
            suppression: None,
        }
    }

    /// These rules, leaving out the events of the users on `list` (none: `None` or empty).
    pub fn with_suppression(self, list: Option<&crate::suppress::Suppression>) -> CuttingRules {
        CuttingRules {
            suppression: list
                .filter(|list| !list.is_empty())
                .map(|list| list.hash().to_string()),
            ..self
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("rules serialize")
    }

    /// The content address: MD5 of the canonical JSON (field order fixed, maps sorted), hex.
    pub fn hash(&self) -> String {
        use md5::Digest as _;
        let digest = md5::Md5::digest(serde_json::to_vec(self).expect("rules serialize"));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses rules fetched from the bucket and checks that this code can cut with them exactly
    /// as the member that stored them did.
    pub fn parse_reproducible(bytes: &[u8]) -> Result<CuttingRules, RulesError> {
        let rules: CuttingRules =
            serde_json::from_slice(bytes).map_err(|err| RulesError::Unreadable(err.to_string()))?;
        if !(OLDEST_ROUTING_CODE..=ROUTING_CODE_VERSION).contains(&rules.routing_code) {
            return Err(RulesError::OtherCode {
                theirs: rules.routing_code,
                ours: ROUTING_CODE_VERSION,
            });
        }
        Ok(rules)
    }
}

/// What releases before content-addressed rules recorded in their intents (version 1): a CRC32
/// of the routing settings and key prefix, beside the file size cap. A member replays such an
/// intent only when its own settings give the same pair.
pub fn legacy_fingerprint(config: &Config) -> (String, u64) {
    let rules = serde_json::to_vec(&(&config.routing, &config.s3.prefix)).expect("rules serialize");
    (
        format!("{:08x}", crc32fast::hash(&rules)),
        config.buffer.max_file_bytes,
    )
}

/// Where the rules with `hash` are stored.
pub fn rules_key(prefix: &str, hash: &str) -> String {
    format!("{prefix}{}/_manifests/_rules/{hash}.json", layout::ROOT)
}

/// Why a member cannot replay a batch with the rules its intent names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("the rules are not in the bucket")]
    Missing,
    #[error("the rules cannot be read by this release: {0}")]
    Unreadable(String),
    #[error("the batch was cut by routing code version {theirs} and this release routes as versions {OLDEST_ROUTING_CODE} to {ours}: run a release with routing code {theirs} until the batch is uploaded")]
    OtherCode { theirs: u32, ours: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DayFormat, SourceRule};

    #[test]
    fn the_hash_names_the_content() {
        let config = Config::default();
        let rules = CuttingRules::of(&config);
        assert_eq!(rules.hash(), CuttingRules::of(&config).hash());
        assert_eq!(rules.hash().len(), 32);
        let mut other = config.clone();
        other.routing.day_format = DayFormat::Date;
        assert_ne!(CuttingRules::of(&other).hash(), rules.hash());
        other = config.clone();
        other.buffer.max_file_bytes += 1;
        assert_ne!(CuttingRules::of(&other).hash(), rules.hash());
        // Settings that do not decide file contents do not change the rules.
        other = config.clone();
        other.buffer.compression_level = 1;
        other.schedule.interval_secs = 60;
        assert_eq!(CuttingRules::of(&other).hash(), rules.hash());
        // The hash is what intents already in the group carry: a change to how the rules
        // serialize would make every member hold the partitions it replays. These are the
        // hashes of the release that introduced content-addressed rules (routing code 1).
        let first_release = |config: &Config| CuttingRules {
            routing_code: 1,
            ..CuttingRules::of(config)
        };
        assert_eq!(
            first_release(&config).hash(),
            "d92b3b372b3f89adc6d146d71f175927"
        );
        let mut chained = config.clone();
        chained.routing.source.extend([
            SourceRule::parse("write-key:writeKey").unwrap(),
            SourceRule::parse("static:fallback").unwrap(),
        ]);
        assert_eq!(
            first_release(&chained).hash(),
            "bf9499a97661a6195b72b4852666f40b"
        );
        // Another routing code is another set of rules.
        assert_ne!(first_release(&config).hash(), rules.hash());
        // Bounds on sources and days decide what is archived: in the rules when set.
        other = config.clone();
        other.routing.allowed_sources.insert("web".into());
        assert_ne!(CuttingRules::of(&other).hash(), rules.hash());
        other = config.clone();
        other.routing.received_at_window_days = Some(7);
        assert_ne!(CuttingRules::of(&other).hash(), rules.hash());
        assert_eq!(
            rules_key("team/", "abc"),
            "team/segment-logs/_manifests/_rules/abc.json"
        );
    }

    #[test]
    fn rules_round_trip_and_foreign_ones_are_refused_with_a_reason() {
        let rules = CuttingRules::of(&Config::default());
        assert_eq!(
            CuttingRules::parse_reproducible(&rules.to_json()),
            Ok(rules.clone())
        );
        let newer = CuttingRules {
            routing_code: ROUTING_CODE_VERSION + 1,
            ..rules.clone()
        };
        assert!(matches!(
            CuttingRules::parse_reproducible(&newer.to_json()),
            Err(RulesError::OtherCode { .. })
        ));
        // An earlier release's batch is replayed as that release routed it.
        let earlier = CuttingRules {
            routing_code: OLDEST_ROUTING_CODE,
            ..rules.clone()
        };
        assert_eq!(
            CuttingRules::parse_reproducible(&earlier.to_json()),
            Ok(earlier.clone())
        );
        let older = CuttingRules {
            routing_code: OLDEST_ROUTING_CODE - 1,
            ..rules.clone()
        };
        assert!(matches!(
            CuttingRules::parse_reproducible(&older.to_json()),
            Err(RulesError::OtherCode { .. })
        ));
        // A setting added by a later release is unknown here.
        let mut json: serde_json::Value = serde_json::from_slice(&rules.to_json()).unwrap();
        json["routing"]["new_setting"] = true.into();
        assert!(matches!(
            CuttingRules::parse_reproducible(json.to_string().as_bytes()),
            Err(RulesError::Unreadable(_))
        ));
    }
}
