//! At assignment, before a partition's recorded intent is replayed: which cutting rules the
//! replay must use, and whether this member can reproduce them at all. The intent names its
//! rules by hash; this member's own rules need nothing, others are fetched from the bucket, and
//! rules this release cannot reproduce (another routing-code version, settings it does not
//! know, rules missing from the bucket) hold the partition instead of guessing. Rules that name
//! a suppression list come with it, fetched from the bucket too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::consume::committed::fetch_until_known;
use crate::pipeline::BatchIntent;
use crate::rules::{legacy_fingerprint, CuttingRules, RulesError};
use crate::suppress::Suppression;

/// Fetches the stored rules with a hash from the bucket (blocking); `Ok(None)` when absent.
pub type FetchRules = Box<dyn Fn(&str) -> Result<Option<Vec<u8>>, String> + Send + Sync>;

pub struct RulesSource {
    /// The hash of this member's rules without a suppression list: what it replays with its
    /// own settings (a list is always fetched, whatever this member's list is now).
    own: String,
    legacy: (String, u64),
    fetch: FetchRules,
    /// Fetches the stored suppression list with a hash (`suppress::list_key`).
    fetch_list: FetchRules,
}

/// The rules a replay must cut with.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplayRules {
    /// The member's own.
    Own,
    /// Another member's (or this member's under a suppression list), fetched from the bucket
    /// with the list they name.
    Theirs(CuttingRules, Option<Arc<Suppression>>),
    /// Not reproducible here: the partition is held, for this reason.
    Hold(String),
}

impl RulesSource {
    pub fn new(config: &Config, fetch: FetchRules) -> RulesSource {
        RulesSource {
            own: CuttingRules::of(config).hash(),
            legacy: legacy_fingerprint(config),
            fetch,
            fetch_list: Box::new(|_| Ok(None)),
        }
    }

    /// Fetches the suppression lists rules name with `fetch_list`.
    pub fn with_lists(self, fetch_list: FetchRules) -> RulesSource {
        RulesSource { fetch_list, ..self }
    }

    /// Decides how `intent` is replayed. `Err` when the bucket did not answer within
    /// `patience`: the caller stops rather than guess.
    pub fn resolve(
        &self,
        intent: &BatchIntent,
        patience: Duration,
        now: impl Fn() -> Instant,
        mut sleep: impl FnMut(Duration),
    ) -> Result<ReplayRules, String> {
        if intent.is_legacy() {
            let recorded = (
                intent.rules.clone(),
                intent.max_file_bytes.unwrap_or_default(),
            );
            return Ok(if recorded == self.legacy {
                ReplayRules::Own
            } else {
                ReplayRules::Hold(format!(
                    "an earlier release recorded it under other cutting rules (fingerprint {}, \
                     buffer.max_file_bytes {}) than this member's (fingerprint {}, {}): run \
                     with those settings until the batch is uploaded",
                    recorded.0, recorded.1, self.legacy.0, self.legacy.1
                ))
            });
        }
        if intent.rules == self.own {
            return Ok(ReplayRules::Own);
        }
        let stored = fetch_until_known(
            "the intent's cutting rules",
            patience,
            &now,
            &mut sleep,
            || (self.fetch)(&intent.rules),
        )?;
        let parsed = match stored {
            Some(bytes) => CuttingRules::parse_reproducible(&bytes),
            None => Err(RulesError::Missing),
        };
        let rules = match parsed {
            Ok(rules) => rules,
            Err(err) => {
                return Ok(ReplayRules::Hold(format!(
                    "its cutting rules {}: {err}",
                    intent.rules
                )))
            }
        };
        let Some(hash) = rules.suppression.clone() else {
            return Ok(ReplayRules::Theirs(rules, None));
        };
        let stored = fetch_until_known(
            "the suppression list its rules name",
            patience,
            &now,
            &mut sleep,
            || (self.fetch_list)(&hash),
        )?;
        Ok(
            match stored.map(|bytes| Suppression::parse(&bytes, &hash)) {
                Some(Ok(list)) => ReplayRules::Theirs(rules, Some(Arc::new(list))),
                Some(Err(err)) => ReplayRules::Hold(format!(
                    "the suppression list {hash} its cutting rules {} name: {err}",
                    intent.rules
                )),
                None => ReplayRules::Hold(format!(
                    "the suppression list {hash} its cutting rules {} name is not in the bucket",
                    intent.rules
                )),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DayFormat;
    use crate::rules::ROUTING_CODE_VERSION;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn source(config: &Config, bucket: HashMap<String, Vec<u8>>) -> RulesSource {
        let bucket = Arc::new(Mutex::new(bucket));
        RulesSource::new(
            config,
            Box::new(move |hash| Ok(bucket.lock().unwrap().get(hash).cloned())),
        )
    }

    fn resolve(source: &RulesSource, intent: &BatchIntent) -> ReplayRules {
        source
            .resolve(intent, Duration::from_secs(1), Instant::now, |_| {})
            .unwrap()
    }

    #[test]
    fn a_replay_cuts_with_the_rules_its_intent_names() {
        let ours = Config::default();
        let mut theirs = Config::default();
        theirs.routing.day_format = DayFormat::Hive;
        theirs.buffer.max_file_bytes = 20_000;
        let their_rules = CuttingRules::of(&theirs);
        let bucket = HashMap::from([(their_rules.hash(), their_rules.to_json())]);
        let source = source(&ours, bucket);
        let own = BatchIntent::new(0, 9, CuttingRules::of(&ours).hash());
        assert_eq!(resolve(&source, &own), ReplayRules::Own);
        let other = BatchIntent::new(0, 9, their_rules.hash());
        assert_eq!(
            resolve(&source, &other),
            ReplayRules::Theirs(their_rules, None)
        );
    }

    #[test]
    fn rules_naming_a_suppression_list_replay_with_it_or_hold_without_it() {
        use crate::suppress::{hash_id, list_key};
        let ours = Config::default();
        let list = Suppression::new([hash_id("user-1")]);
        let rules = CuttingRules::of(&ours).with_suppression(Some(&list));
        assert_ne!(rules.hash(), CuttingRules::of(&ours).hash());
        let lists = Arc::new(Mutex::new(HashMap::from([(
            list_key("", list.hash()),
            list.to_json(),
        )])));
        let with_lists = |lists: Arc<Mutex<HashMap<String, Vec<u8>>>>| {
            source(&ours, HashMap::from([(rules.hash(), rules.to_json())])).with_lists(Box::new(
                move |hash| Ok(lists.lock().unwrap().get(&list_key("", hash)).cloned()),
            ))
        };
        let intent = BatchIntent::new(0, 9, rules.hash());
        assert_eq!(
            resolve(&with_lists(Arc::clone(&lists)), &intent),
            ReplayRules::Theirs(rules.clone(), Some(Arc::new(list)))
        );
        lists.lock().unwrap().clear();
        let ReplayRules::Hold(reason) = resolve(&with_lists(lists), &intent) else {
            panic!("a missing list must hold the partition");
        };
        assert!(reason.contains("suppression list"), "{reason}");
    }

    #[test]
    fn rules_this_release_cannot_reproduce_hold_the_partition() {
        let ours = Config::default();
        let newer = CuttingRules {
            routing_code: ROUTING_CODE_VERSION + 1,
            ..CuttingRules::of(&ours)
        };
        let bucket = HashMap::from([(newer.hash(), newer.to_json())]);
        let source = source(&ours, bucket);
        let ReplayRules::Hold(reason) = resolve(&source, &BatchIntent::new(0, 9, newer.hash()))
        else {
            panic!("another routing code must hold the partition");
        };
        assert!(reason.contains("routing code version"), "{reason}");
        let ReplayRules::Hold(reason) = resolve(&source, &BatchIntent::new(0, 9, "f00".into()))
        else {
            panic!("missing rules must hold the partition");
        };
        assert!(reason.contains("not in the bucket"), "{reason}");
    }

    #[test]
    fn intents_of_earlier_releases_replay_only_under_the_same_settings() {
        let ours = Config::default();
        let source = source(&ours, HashMap::new());
        let (fingerprint, cap) = legacy_fingerprint(&ours);
        let legacy = |fingerprint: &str, cap: u64| {
            BatchIntent::decode(&format!(
                r#"{{"v":1,"start":0,"end":9,"max_file_bytes":{cap},"rules":"{fingerprint}"}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            resolve(&source, &legacy(&fingerprint, cap)),
            ReplayRules::Own
        );
        assert!(matches!(
            resolve(&source, &legacy(&fingerprint, cap + 1)),
            ReplayRules::Hold(_)
        ));
    }

    #[test]
    fn a_bucket_that_does_not_answer_is_an_error_not_a_guess() {
        let source = RulesSource::new(
            &Config::default(),
            Box::new(|_| Err("connection refused".to_string())),
        );
        let clock = std::cell::Cell::new(Instant::now());
        let err = source
            .resolve(
                &BatchIntent::new(0, 9, "abc".into()),
                Duration::from_secs(60),
                || clock.get(),
                |d| clock.set(clock.get() + d),
            )
            .unwrap_err();
        assert!(err.starts_with("connection refused"), "{err}");
    }
}
