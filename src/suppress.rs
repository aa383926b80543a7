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
//! Ids are kept only hashed ([`IdHash`]: a SHA-256, as `printf %s "$id" | sha256sum` prints it,
//! and a 64-bit routing key): no request, list, log line or metric holds one in the clear.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::layout;

/// The top-level event fields whose string value is matched against the list.
pub const ID_FIELDS: [&str; 2] = ["userId", "anonymousId"];

/// One suppressed id as lists and requests keep it: its SHA-256, the only form anything outside
/// the routing hot path names it by, and a 64-bit key ([`key_of`]) routing looks up first,
/// because a SHA-256 of every event's two ids cost routing 45 % more (`benches/hot_path.rs`); a
/// key found is then confirmed by the SHA-256, so a producer crafting a colliding id suppresses
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdHash {
    pub sha256: [u8; 32],
    pub key: u64,
}

impl IdHash {
    /// `sha256hex:keyhex`, as requests and lists store it.
    pub fn encode(&self) -> String {
        let mut text = Vec::with_capacity(64 + 1 + 16);
        self.encode_into(&mut text);
        String::from_utf8(text).expect("hex digits are ASCII")
    }

    /// [`IdHash::encode`] appended to `out`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        hex_into(&self.sha256, out);
        out.push(b':');
        hex_into(&self.key.to_be_bytes(), out);
    }

    pub fn decode(text: &str) -> Option<IdHash> {
        let (sha, key) = text.split_once(':')?;
        Some(IdHash {
            sha256: parse_hex(sha)?,
            key: u64::from_str_radix(key, 16)
                .ok()
                .filter(|_| key.len() == 16)?,
        })
    }

    /// The SHA-256 in hex, as `printf %s "$id" | sha256sum` prints it.
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }
}

/// Every value of an id field ([`ID_FIELDS`]) at the top level of a JSON object, strings and
/// whole numbers (as their digits), each occurrence of a field given twice included. For what
/// is read back from the archive (`restore`, `forget`), where routing's one pass is not at hand.
/// Bytes that stop being JSON keep the ids read before they stopped (a `too-large` dead letter
/// keeps only the start of its record): nothing, for bytes that are no JSON object.
pub fn top_level_ids(json: &[u8]) -> Vec<String> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    struct Ids<'v>(&'v mut Vec<String>);
    impl<'de> Visitor<'de> for Ids<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if !ID_FIELDS.contains(&key.as_ref()) {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(id) => self.0.push(id),
                    serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => {
                        self.0.push(n.to_string())
                    }
                    _ => {}
                }
            }
            Ok(())
        }
    }
    let mut ids = Vec::new();
    let _ = serde_json::Deserializer::from_slice(json).deserialize_map(Ids(&mut ids));
    ids
}

/// The ids a dead letter line names: those of the record it keeps (all of it, or the start of a
/// `too-large` one) and its Kafka key, as routing matches a dead-lettered record's; nothing for
/// a line that is no dead letter.
pub fn dead_letter_ids(line: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct Letter {
        key_base64: Option<String>,
        payload_base64: Option<String>,
    }
    use base64::Engine as _;
    let Ok(letter) = serde_json::from_slice::<Letter>(line) else {
        return Vec::new();
    };
    let decode = |text: Option<String>| {
        text.and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
    };
    let mut ids = decode(letter.payload_base64)
        .map(|payload| top_level_ids(&payload))
        .unwrap_or_default();
    ids.extend(decode(letter.key_base64).and_then(|key| String::from_utf8(key).ok()));
    ids
}

/// The hashes of one id.
pub fn hash_id(id: &str) -> IdHash {
    IdHash {
        sha256: sha2::Sha256::digest(id.as_bytes()).into(),
        key: key_of(id),
    }
}

/// The routing key of an id: SipHash-2-4 under a fixed key, which, unlike a fast mixing
/// function, cannot be run backwards to the id (only guessed, as a SHA-256 can). Part of the
/// stored lists' format: never change it.
pub fn key_of(id: &str) -> u64 {
    use std::hash::Hasher as _;
    // std's SipHasher is deprecated for HashMap use only; it is SipHash-2-4, fixed for good.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new_with_keys(ROUTING_KEY.0, ROUTING_KEY.1);
    hasher.write(id.as_bytes());
    hasher.finish()
}

/// SipHash's key for [`key_of`]: public, so it keys nothing secret; it only makes the routing
/// key one way.
const ROUTING_KEY: (u64, u64) = (0x6b61_666b_612d_7333, 0x7375_7070_7265_7373);

/// Lower-case hex of `bytes`. A list of 100,000 ids is 3.2 million of these bytes, encoded at
/// every member's refresh: a `format!` a byte was most of a refresh's time.
fn hex(bytes: &[u8]) -> String {
    let mut text = Vec::with_capacity(2 * bytes.len());
    hex_into(bytes, &mut text);
    String::from_utf8(text).expect("hex digits are ASCII")
}

fn hex_into(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0xf)]);
    }
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            b'A'..=b'F' => Some(digit - b'A' + 10),
            _ => None,
        }
    }
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(hash)
}

/// Keys are hashes already: the set uses them as they are.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

type KeySet = HashSet<u64, std::hash::BuildHasherDefault<KeyHasher>>;

/// A suppression list as routing uses it: the suppressed ids, and the list's own content
/// address (what cutting rules name).
#[derive(Debug, Clone)]
pub struct Suppression {
    hash: String,
    /// Every id, as stored.
    all: BTreeSet<IdHash>,
    /// Their SHA-256s and routing keys, looked up per event.
    sha256s: HashSet<[u8; 32]>,
    keys: KeySet,
}

impl PartialEq for Suppression {
    fn eq(&self, other: &Suppression) -> bool {
        self.all == other.all
    }
}

impl Eq for Suppression {}

/// A list as the bucket keeps it (`list_key`): sorted, so its bytes and hash depend only on
/// the ids.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredList {
    ids: Vec<String>,
}

impl Suppression {
    pub fn new(ids: impl IntoIterator<Item = IdHash>) -> Suppression {
        let all: BTreeSet<IdHash> = ids.into_iter().collect();
        Suppression {
            hash: md5_hex(&Self::json_of(&all)),
            sha256s: all.iter().map(|id| id.sha256).collect(),
            keys: all.iter().map(|id| id.key).collect(),
            all,
        }
    }

    /// The stored form, byte for byte what serde_json writes for a [`StoredList`] (the list's
    /// name is the MD5 of these bytes), written straight into one buffer: a hundred thousand
    /// ids as strings first cost as much again.
    fn json_of(all: &BTreeSet<IdHash>) -> Vec<u8> {
        const ENCODED: usize = 64 + 1 + 16;
        let mut json = Vec::with_capacity(12 + all.len() * (ENCODED + 3));
        json.extend_from_slice(br#"{"ids":["#);
        for (n, id) in all.iter().enumerate() {
            if n > 0 {
                json.push(b',');
            }
            json.push(b'"');
            id.encode_into(&mut json);
            json.push(b'"');
        }
        json.extend_from_slice(b"]}");
        json
    }

    /// The list's bytes in the bucket.
    pub fn to_json(&self) -> Vec<u8> {
        Self::json_of(&self.all)
    }

    /// A list fetched from the bucket; `hash` is the one a rule named, checked against its bytes.
    pub fn parse(bytes: &[u8], hash: &str) -> Result<Suppression, SuppressionError> {
        let stored: StoredList = serde_json::from_slice(bytes)
            .map_err(|err| SuppressionError::Unreadable(err.to_string()))?;
        let ids = stored
            .ids
            .iter()
            .map(|text| IdHash::decode(text).ok_or_else(|| SuppressionError::BadHash(text.clone())))
            .collect::<Result<Vec<_>, _>>()?;
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
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Whether the list holds `id`.
    pub fn holds(&self, id: &IdHash) -> bool {
        self.all.contains(id)
    }

    /// Whether an id whose routing key is `key` may be on the list (a key is 64 bits of the
    /// id: [`Suppression::matches`] settles it). What lets routing rule an event out with the
    /// keys the id index already computed.
    pub fn may_hold_key(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    /// Whether an event whose id field holds `id` is suppressed.
    pub fn matches(&self, id: &str) -> bool {
        self.may_hold_key(key_of(id))
            && self
                .sha256s
                .contains(&<[u8; 32]>::from(sha2::Sha256::digest(id.as_bytes())))
    }

    /// The list with every id of `requests` added.
    pub fn with_requests<'r>(
        &self,
        requests: impl IntoIterator<Item = &'r Request>,
    ) -> Suppression {
        let mut all = self.all.clone();
        for request in requests {
            all.extend(request.ids.iter().filter_map(|text| IdHash::decode(text)));
        }
        Suppression::new(all)
    }
}

/// One `suppress` call, as the bucket keeps it (`request_key`). Never rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request: String,
    pub time: DateTime<Utc>,
    /// Each id's hashes ([`IdHash::encode`]).
    pub ids: Vec<String>,
}

impl Request {
    pub fn new(request: String, time: DateTime<Utc>, ids: &BTreeSet<IdHash>) -> Request {
        Request {
            request,
            time,
            ids: ids.iter().map(IdHash::encode).collect(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Request, SuppressionError> {
        let request: Request = serde_json::from_slice(bytes)
            .map_err(|err| SuppressionError::Unreadable(err.to_string()))?;
        if let Some(bad) = request
            .ids
            .iter()
            .find(|text| IdHash::decode(text).is_none())
        {
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
    hex(&md5::Md5::digest(bytes))
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

/// Ids as an operator gives them, one per line (surrounding blanks trimmed, blank lines
/// skipped), hashed: nothing keeps them in the clear.
pub fn parse_ids<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeSet<IdHash> {
    lines
        .into_iter()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(hash_id)
        .collect()
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
    fn ids_are_matched_by_their_hashes_and_never_kept_in_the_clear() {
        let list = Suppression::new([hash_id("user-42"), hash_id("anon-7")]);
        assert!(list.matches("user-42") && list.matches("anon-7"));
        assert!(!list.matches("user-43") && !list.matches(""));
        // What `printf %s user-42 | sha256sum` prints.
        assert_eq!(
            hash_id("user-42").sha256_hex(),
            "6d894aa3ee802549d7f340e7c1cf0d1c1cb14cd84f768d92ffaa6785337c4997"
        );
        let id = hash_id("user-42");
        assert_eq!(IdHash::decode(&id.encode()), Some(id));
        assert_eq!(IdHash::decode("6d89:00"), None);
        // The stored form (lists are named by the MD5 of theirs): the SHA-256 and the routing
        // key in lower-case hex, the key zero-padded to 16 digits.
        let small = IdHash {
            sha256: [0xab; 32],
            key: 0x0f,
        };
        assert_eq!(
            small.encode(),
            format!("{}:000000000000000f", "ab".repeat(32))
        );
        assert_eq!(IdHash::decode(&small.encode()), Some(small));
        let json = String::from_utf8(list.to_json()).unwrap();
        assert!(!json.contains("user-42") && json.contains(&id.sha256_hex()));
        // Byte for byte what serde_json writes for it, from which lists are named.
        for ids in [
            vec![],
            vec![hash_id("a")],
            (0..50).map(|n| hash_id(&n.to_string())).collect(),
        ] {
            let list = Suppression::new(ids);
            let stored = StoredList {
                ids: list.all.iter().map(IdHash::encode).collect(),
            };
            assert_eq!(list.to_json(), serde_json::to_vec(&stored).unwrap());
        }
    }

    /// The routing key is part of the stored lists: the same for an id on every release.
    #[test]
    fn routing_keys_are_stable_and_a_key_alone_suppresses_nothing() {
        // SipHash-2-4 as an independent implementation computes it (one that gives the
        // reference vector, 0x726fdb47dd0e0e31 for the empty message under key 00..0f).
        assert_eq!(key_of("user-42"), 0x4a1d_ac34_b2fc_2e34);
        assert_eq!(key_of(""), 0xb2b5_2b12_ac25_8994);
        let keys: HashSet<u64> = ["a", "a\0", "user-1", "user-10", "0123456789abcdef01"]
            .iter()
            .map(|id| key_of(id))
            .collect();
        assert_eq!(keys.len(), 5, "lengths and tails are mixed in");
        // An id whose key is on the list but whose SHA-256 is not is not suppressed.
        let mut forged = hash_id("user-42");
        forged.sha256 = hash_id("someone else").sha256;
        assert!(!Suppression::new([forged]).matches("user-42"));
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
    fn every_id_at_the_top_level_is_found_duplicates_and_numbers_too() {
        let json = br#"{"userId":"a","x":{"userId":"nested"},"anonymousId":7,"userId":"b"}"#;
        assert_eq!(top_level_ids(json), ["a", "7", "b"]);
        assert!(top_level_ids(b"not json").is_empty());
        assert!(top_level_ids(br#"["userId"]"#).is_empty());
        // The start of a record cut short keeps the ids before the cut.
        assert_eq!(top_level_ids(br#"{"userId":"a","properties":{"x":"#), ["a"]);
    }

    #[test]
    fn a_dead_letter_names_the_ids_of_its_record_and_its_key() {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let letter = format!(
            r#"{{"reason":"too-large","key_base64":"{}","payload_base64":"{}"}}"#,
            b64(b"user-k"),
            b64(br#"{"anonymousId":"anon-1","properties":{"#)
        );
        assert_eq!(dead_letter_ids(letter.as_bytes()), ["anon-1", "user-k"]);
        assert!(dead_letter_ids(b"{}").is_empty() && dead_letter_ids(b"no").is_empty());
    }

    #[test]
    fn ids_are_read_one_per_line_and_hashed() {
        let ids = parse_ids(["user-1", "", "  user-2 ", "user-1"]);
        assert_eq!(ids, BTreeSet::from([hash_id("user-1"), hash_id("user-2")]));
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
