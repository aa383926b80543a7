//! Suppression: the users whose events the archive no longer takes (a deletion request under
//! GDPR Article 17 or the CCPA, as Segment's `SUPPRESS_WITH_DELETE`).
//!
//! An operator adds ids with `kafka-s3-archiver suppress`, which puts one request object in the
//! bucket; requests are never rewritten, so two operators adding at once lose nothing. Every
//! member reads the requests every `suppression.refresh_secs` and, when their union changed,
//! stores it as one content-addressed list with the cutting rules that name its hash (both
//! before any batch is cut with them), then cuts each partition's next batch with those rules:
//! a matching event (its `userId` or `anonymousId`) is not archived, and its offset is recorded
//! in the batch's manifest as a `suppressed` gap. A replay fetches the list its rules name, so
//! it cuts exactly what its first attempt cut.
//!
//! Ids are kept only as SHA-256 hashes (hex): no request, list, log line or metric holds one in
//! the clear. `printf %s "$id" | sha256sum` gives an id's hash.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::layout;

/// The top-level event fields whose string value is matched against the list.
pub const ID_FIELDS: [&str; 2] = ["userId", "anonymousId"];

/// The hash of one id, as lists and requests keep it.
pub fn hash_id(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

/// Hex of an id hash.
pub fn hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// An id hash from its hex; `None` unless 64 hex digits.
pub fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// A suppression list as routing uses it: the hashes of the suppressed ids, and the list's own
/// content address (what cutting rules name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppression {
    hash: String,
    ids: HashSet<[u8; 32]>,
}

/// A list as the bucket keeps it (`list_key`): sorted hex, so its bytes and hash depend only on
/// the ids.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredList {
    ids: BTreeSet<String>,
}

impl Suppression {
    pub fn new(ids: impl IntoIterator<Item = [u8; 32]>) -> Suppression {
        let ids: HashSet<[u8; 32]> = ids.into_iter().collect();
        let hash = md5_hex(&Self::json_of(&ids));
        Suppression { hash, ids }
    }

    fn json_of(ids: &HashSet<[u8; 32]>) -> Vec<u8> {
        let stored = StoredList {
            ids: ids.iter().map(hex).collect(),
        };
        serde_json::to_vec(&stored).expect("list serializes")
    }

    /// The list's bytes in the bucket.
    pub fn to_json(&self) -> Vec<u8> {
        Self::json_of(&self.ids)
    }

    /// A list fetched from the bucket; `hash` is the one a rule named, checked against its bytes.
    pub fn parse(bytes: &[u8], hash: &str) -> Result<Suppression, SuppressionError> {
        let stored: StoredList = serde_json::from_slice(bytes)
            .map_err(|err| SuppressionError::Unreadable(err.to_string()))?;
        let ids = stored
            .ids
            .iter()
            .map(|text| parse_hex(text).ok_or_else(|| SuppressionError::BadHash(text.clone())))
            .collect::<Result<HashSet<_>, _>>()?;
        let list = Suppression::new(ids);
        if list.hash != hash {
            return Err(SuppressionError::HashMismatch {
                named: hash.to_string(),
                content: list.hash,
            });
        }
        Ok(list)
    }

    /// Its content address.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether an event whose id field holds `id` is suppressed.
    pub fn matches(&self, id: &str) -> bool {
        !self.ids.is_empty() && self.ids.contains(&hash_id(id))
    }

    /// The list with every id of `requests` added.
    pub fn with_requests<'r>(
        &self,
        requests: impl IntoIterator<Item = &'r Request>,
    ) -> Suppression {
        let mut ids = self.ids.clone();
        for request in requests {
            ids.extend(request.ids.iter().filter_map(|text| parse_hex(text)));
        }
        Suppression::new(ids)
    }
}

/// One `suppress` call, as the bucket keeps it (`request_key`). Never rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request: String,
    pub time: DateTime<Utc>,
    /// Hex SHA-256 of each id.
    pub ids: Vec<String>,
}

impl Request {
    pub fn new(request: String, time: DateTime<Utc>, ids: &BTreeSet<[u8; 32]>) -> Request {
        Request {
            request,
            time,
            ids: ids.iter().map(hex).collect(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Request, SuppressionError> {
        let request: Request = serde_json::from_slice(bytes)
            .map_err(|err| SuppressionError::Unreadable(err.to_string()))?;
        if let Some(bad) = request.ids.iter().find(|text| parse_hex(text).is_none()) {
            return Err(SuppressionError::BadHash(bad.clone()));
        }
        Ok(request)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("request serializes")
    }
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest as _;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn root(prefix: &str) -> String {
    format!("{prefix}{}/_manifests/_suppression", layout::ROOT)
}

/// Where the list with `hash` is stored.
pub fn list_key(prefix: &str, hash: &str) -> String {
    format!("{}/lists/{hash}.json", root(prefix))
}

/// Where the requests are: one object each, named by time then id, so a listing is in order.
pub fn requests_prefix(prefix: &str) -> String {
    format!("{}/requests/", root(prefix))
}

pub fn request_key(prefix: &str, request: &Request) -> String {
    format!(
        "{}{}-{}.json",
        requests_prefix(prefix),
        request.time.format("%Y%m%dT%H%M%S%.3fZ"),
        request.request
    )
}

/// Ids as an operator gives them: one per line (blank lines skipped), either in the clear or,
/// with `hashed`, as hex SHA-256 (what `sha256sum` prints).
pub fn parse_ids<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    hashed: bool,
) -> Result<BTreeSet<[u8; 32]>, SuppressionError> {
    let mut ids = BTreeSet::new();
    for line in lines {
        let id = line.trim();
        if id.is_empty() {
            continue;
        }
        ids.insert(if hashed {
            parse_hex(&id.to_ascii_lowercase())
                .ok_or_else(|| SuppressionError::BadHash(id.to_string()))?
        } else {
            hash_id(id)
        });
    }
    Ok(ids)
}

/// The list this member cuts new batches with: set by the follower
/// (`upload::suppression::Follower`) once the list and the rules naming it are in the bucket,
/// read by the buffer workers at each batch boundary.
#[derive(Debug, Default)]
pub struct CurrentList(RwLock<Option<Arc<Suppression>>>);

impl CurrentList {
    pub fn get(&self) -> Option<Arc<Suppression>> {
        self.0.read().expect("list lock").clone()
    }

    pub fn set(&self, list: Arc<Suppression>) {
        *self.0.write().expect("list lock") = Some(list);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuppressionError {
    #[error("unreadable suppression object: {0}")]
    Unreadable(String),
    #[error("not a hex SHA-256 id hash: {0:?}")]
    BadHash(String),
    #[error("the list stored as {named} holds the list {content}")]
    HashMismatch { named: String, content: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_matched_by_their_sha256_and_never_kept_in_the_clear() {
        let list = Suppression::new([hash_id("user-42"), hash_id("anon-7")]);
        assert!(list.matches("user-42") && list.matches("anon-7"));
        assert!(!list.matches("user-43") && !list.matches(""));
        // What `printf %s user-42 | sha256sum` prints.
        assert_eq!(
            hex(&hash_id("user-42")),
            "6d894aa3ee802549d7f340e7c1cf0d1c1cb14cd84f768d92ffaa6785337c4997"
        );
        assert_eq!(
            parse_hex(&hex(&hash_id("user-42"))),
            Some(hash_id("user-42"))
        );
        let json = String::from_utf8(list.to_json()).unwrap();
        assert!(!json.contains("user-42") && json.contains(&hex(&hash_id("user-42"))));
    }

    #[test]
    fn a_list_is_named_by_its_ids_whatever_their_order_and_checked_when_fetched() {
        let a = Suppression::new([hash_id("a"), hash_id("b")]);
        let b = Suppression::new([hash_id("b"), hash_id("a"), hash_id("a")]);
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), Suppression::new([hash_id("a")]).hash());
        assert_eq!(Suppression::parse(&a.to_json(), a.hash()).unwrap(), a);
        assert!(matches!(
            Suppression::parse(&a.to_json(), "0000"),
            Err(SuppressionError::HashMismatch { .. })
        ));
        assert!(Suppression::parse(br#"{"ids":["zz"]}"#, "x").is_err());
    }

    #[test]
    fn ids_are_given_in_the_clear_or_hashed() {
        let clear = parse_ids(["user-1", "", "  user-2 ", "user-1"], false).unwrap();
        assert_eq!(
            clear,
            BTreeSet::from([hash_id("user-1"), hash_id("user-2")])
        );
        let hex_upper = hex(&hash_id("user-1")).to_ascii_uppercase();
        let hashed = parse_ids([hex_upper.as_str()], true).unwrap();
        assert_eq!(hashed, BTreeSet::from([hash_id("user-1")]));
        assert!(matches!(
            parse_ids(["user-1"], true),
            Err(SuppressionError::BadHash(_))
        ));
    }

    #[test]
    fn requests_add_up_and_are_listed_in_time_order() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(1_700_000_001, 0).unwrap();
        let first = Request::new("r1".into(), t0, &BTreeSet::from([hash_id("a")]));
        let second = Request::new("r2".into(), t1, &BTreeSet::from([hash_id("b")]));
        assert!(request_key("", &first) < request_key("", &second));
        assert!(request_key("p/", &first).starts_with(&requests_prefix("p/")));
        let list = Suppression::new([]).with_requests([&first, &second]);
        assert!(list.matches("a") && list.matches("b") && list.len() == 2);
        assert_eq!(Request::parse(&first.to_json()).unwrap(), first);
        assert!(
            Request::parse(br#"{"request":"x","time":"2026-01-01T00:00:00Z","ids":["nope"]}"#)
                .is_err()
        );
    }
}
