//! What a `forget` request leaves in the bucket, under
//! `{prefix}segment-logs/_manifests/_forget/{request}/`: the journal of every rewrite it plans,
//! put before the first one (a rerun finishes from it and rewrites nothing twice; `verify`
//! explains with it an object whose manifest is not updated yet), and the audit record once it
//! is done. Both name ids by their SHA-256 only.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::rewrite::Content;
use crate::layout;
use crate::suppress::IdHash;

/// Which part of the archive a request covers: the objects of some sources (all when empty)
/// and received days (all when open); dead letters of those days too, since a dead letter has
/// no source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetSelection {
    pub sources: BTreeSet<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

impl ForgetSelection {
    /// Whether an object of `source` (`None`: a dead letter) and `day` (`None`: an undated dead
    /// letter's, which any day may be) is covered.
    pub fn covers(&self, source: Option<&str>, day: Option<NaiveDate>) -> bool {
        let dated = day.is_none_or(|day| {
            self.from.is_none_or(|from| day >= from) && self.to.is_none_or(|to| day <= to)
        });
        let sourced = source.is_none_or(|s| self.sources.is_empty() || self.sources.contains(s));
        dated && sourced
    }
}

/// The name of a request: the same ids over the same selection of the same archive are the same
/// request, so a rerun finds its journal and finishes it.
pub fn request_id(
    prefix: &str,
    topic: &str,
    ids: &BTreeSet<IdHash>,
    selection: &ForgetSelection,
) -> String {
    use md5::Digest as _;
    let mut hasher = md5::Md5::new();
    hasher.update(format!(
        "forget v1\n{prefix}\n{topic}\n{:?}\n{:?}\n{:?}\n",
        selection.sources, selection.from, selection.to
    ));
    for id in ids {
        hasher.update(id.sha256);
    }
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn folder(prefix: &str, request: &str) -> String {
    format!("{prefix}{}/_manifests/_forget/{request}", layout::ROOT)
}

/// Where every request's journal and audit record are.
pub fn forget_prefix(prefix: &str) -> String {
    format!("{prefix}{}/_manifests/_forget/", layout::ROOT)
}

/// The request a key under [`forget_prefix`] belongs to, and whether it is its journal (or its
/// audit record).
pub fn request_of<'k>(prefix: &str, key: &'k str) -> Option<(&'k str, bool)> {
    let (request, file) = key.strip_prefix(&forget_prefix(prefix))?.split_once('/')?;
    match file {
        "journal.json" => Some((request, true)),
        "audit.json" => Some((request, false)),
        _ => None,
    }
}

pub fn journal_key(prefix: &str, request: &str) -> String {
    format!("{}/journal.json", folder(prefix, request))
}

pub fn audit_key(prefix: &str, request: &str) -> String {
    format!("{}/audit.json", folder(prefix, request))
}

/// Every rewrite of a request, planned from one read of the selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub request: String,
    pub made: DateTime<Utc>,
    /// The forgotten ids ([`IdHash::encode`]): a rerun checks it forgets the same ones.
    pub ids: Vec<String>,
    pub selection: ForgetSelection,
    pub rewrites: Vec<Rewrite>,
    /// When the request's first run began, and what it read: for the audit record, whichever
    /// run finishes the request.
    #[serde(default)]
    pub started: Option<DateTime<Utc>>,
    #[serde(default)]
    pub objects_read: u64,
    #[serde(default)]
    pub bytes_read: u64,
}

pub const JOURNAL_VERSION: u32 = 1;

/// One object to rewrite: what it held when read and what it holds once rewritten. Both are
/// what `verify` may find there until the manifest is updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    pub key: String,
    /// The manifest of its batch (`None`: an object no manifest lists, an interrupted attempt's
    /// copy).
    pub manifest: Option<String>,
    pub old: Content,
    pub new: Content,
    pub old_compressed_bytes: u64,
}

impl Rewrite {
    pub fn removed(&self) -> u64 {
        self.old.records - self.new.records
    }
}

/// What each object the journals name is to hold before and after its rewrite, by key, with
/// the request (requests run one after the other may name the same object).
pub type Journaled = std::collections::HashMap<String, Vec<(String, Rewrite)>>;

/// Why an object holds other lines than its manifest entry (`expected`: lines and CRC32) when a
/// journal explains it: `forget` rewrote it (`actual` is the journal's new content) and was
/// stopped before it updated the manifest. `None` when no journal explains it.
pub fn unfinished(
    journaled: &Journaled,
    key: &str,
    expected: &(u64, String),
    actual: (u64, &str),
) -> Option<String> {
    journaled.get(key)?.iter().find_map(|(request, rewrite)| {
        let was_old = expected.0 == rewrite.old.records && expected.1 == rewrite.old.crc32;
        let holds_new = actual.0 == rewrite.new.records && actual.1 == rewrite.new.crc32;
        (was_old && holds_new).then(|| {
            format!(
                "{key}: rewritten by forget request {request} ({} lines taken out) before its manifest was updated: finish that request (`forget --finish {request}`)",
                rewrite.removed()
            )
        })
    })
}

impl Journal {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("journal serializes")
    }
}

/// The proof a request was carried out: what it read and rewrote, ids hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub request: String,
    /// When the ids went on the suppression list (the `suppress` request this one made).
    pub suppressed_since: Option<DateTime<Utc>>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// SHA-256 of each id, as `printf %s "$id" | sha256sum` prints it.
    pub id_sha256s: Vec<String>,
    pub selection: ForgetSelection,
    pub objects_read: u64,
    pub bytes_read: u64,
    pub objects_rewritten: u64,
    pub lines_removed: u64,
    pub manifests_updated: u64,
    /// Earlier versions of rewritten objects deleted (a versioned bucket).
    pub versions_deleted: u64,
    /// Objects (or earlier versions) that hold the users' events and were not rewritten (or
    /// deleted), each with why.
    pub left_alone: Vec<String>,
}

impl Audit {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("audit serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suppress::hash_id;

    #[test]
    fn a_request_is_named_by_its_ids_and_selection_whatever_their_order() {
        let ids = |names: &[&str]| names.iter().map(|n| hash_id(n)).collect::<BTreeSet<_>>();
        let all = ForgetSelection::default();
        let a = request_id("", "t", &ids(&["u1", "u2"]), &all);
        assert_eq!(a, request_id("", "t", &ids(&["u2", "u1"]), &all));
        assert_ne!(a, request_id("", "t", &ids(&["u1"]), &all));
        assert_ne!(a, request_id("p/", "t", &ids(&["u1", "u2"]), &all));
        let one_source = ForgetSelection {
            sources: BTreeSet::from(["s".to_string()]),
            ..all
        };
        assert_ne!(a, request_id("", "t", &ids(&["u1", "u2"]), &one_source));
    }

    #[test]
    fn a_selection_covers_its_sources_and_days_and_the_dead_letters_of_those_days() {
        let day = |d: u32| NaiveDate::from_ymd_opt(2026, 3, d);
        let selection = ForgetSelection {
            sources: BTreeSet::from(["s1".to_string()]),
            from: day(2),
            to: day(4),
        };
        assert!(selection.covers(Some("s1"), day(2)) && selection.covers(Some("s1"), day(4)));
        assert!(!selection.covers(Some("s1"), day(5)) && !selection.covers(Some("s2"), day(3)));
        assert!(selection.covers(None, day(3)) && !selection.covers(None, day(1)));
        assert!(
            selection.covers(None, None),
            "an undated letter may be of any day"
        );
        assert!(ForgetSelection::default().covers(Some("any"), day(9)));
    }
}
