//! The id index: with every batch, one object beside its manifest that says, for each of its
//! objects, which users' events it may hold — a Bloom filter of the routing keys
//! (`suppress::key_of`) of its events' top-level `userId` and `anonymousId` (a dead letter's:
//! those of its record and its Kafka key). `forget` reads only the objects whose filter may hold
//! one of the ids it forgets; an object without a filter (its file was reopened after a restart,
//! or adopted from another attempt with lines this one did not read) is read whole.
//!
//! Routing collects the keys ([`IdKeys`]) in the pass it makes anyway; the buffer adds them to
//! its file's filter ([`IdFilter`]); the uploader puts the index before the manifest, so a
//! manifest written by this release has its index.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::layout;

/// The routing keys of one record's ids: at most [`IdKeys::CAPACITY`]; a record naming more
/// (a field given many times) makes its file's filter unknown rather than incomplete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdKeys {
    keys: [u64; IdKeys::CAPACITY],
    len: u8,
    overflow: bool,
}

impl IdKeys {
    pub const CAPACITY: usize = 4;

    pub fn push(&mut self, id: &str) {
        let key = crate::suppress::key_of(id);
        if self.keys[..usize::from(self.len)].contains(&key) {
            return;
        }
        match self.keys.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = key;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    /// The ids could not all be read (too many, or a record too large to read again).
    pub fn unknown() -> IdKeys {
        IdKeys {
            overflow: true,
            ..IdKeys::default()
        }
    }

    pub fn keys(&self) -> &[u64] {
        &self.keys[..usize::from(self.len)]
    }

    pub fn is_complete(&self) -> bool {
        !self.overflow
    }
}

/// Probes per key of a stage that names none: every stage of an index written before stages
/// carried their own. The index still records it, so a reader of that time (which probes every
/// stage this many times) keeps reading new indexes: a stage's positions are one sequence, and
/// probing its first seven finds every key a stage of more probes holds.
const PROBES: u64 = 7;
/// Keys the first stage is sized for; each next one holds twice as many. Small, because most
/// files hold few users and a partition may have thousands open: 12,800 files at 512 keys held
/// 8 MB of filters in the memory benchmark, at 64 keys 1.2 MB.
const FIRST_STAGE_KEYS: u64 = 64;
/// Probes per key of the first stage; every second stage takes one more, and bits per key to
/// match (`probes / ln 2`, about 0.3 % false positives in the first stage). The error rates of
/// successive stages then shrink geometrically, so a file's whole filter stays under 2 %
/// however many stages it grows (a fixed rate per stage added 1 % with each).
const FIRST_STAGE_PROBES: u64 = 8;

fn stage_probes(stage: usize) -> u64 {
    FIRST_STAGE_PROBES + stage as u64 / 2
}

/// Bits per key of a stage of `probes` probes: about the count at which that many probes give
/// the lowest false positive rate, `probes / ln 2`.
fn bits_per_key(probes: u64) -> u64 {
    (probes * 10).div_ceil(7)
}

/// A scalable Bloom filter of routing keys: stages of doubling size, each filled to its
/// capacity in turn, so a file of a dozen users costs 96 bytes and one of 100,000 about 24 bits
/// a user (the later stages' tighter error rates cost bits: 12 a key in the first stage, 19 in
/// the eleventh).
#[derive(Clone, PartialEq, Eq)]
pub struct IdFilter {
    stages: Vec<Stage>,
}

impl std::fmt::Debug for IdFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: u64 = self.stages.iter().map(|s| s.inserted).sum();
        write!(f, "IdFilter({keys} keys, {} bytes)", self.heap_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stage {
    words: Vec<u64>,
    capacity: u64,
    inserted: u64,
    probes: u64,
}

impl Stage {
    fn new(index: usize) -> Stage {
        let capacity = FIRST_STAGE_KEYS << index;
        let probes = stage_probes(index);
        Stage {
            words: vec![0; (capacity * bits_per_key(probes)).div_ceil(64) as usize],
            capacity,
            inserted: 0,
            probes,
        }
    }

    fn bits(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    fn contains(&self, key: u64) -> bool {
        positions(key, self.bits(), self.probes)
            .all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    fn insert(&mut self, key: u64) {
        for bit in positions(key, self.bits(), self.probes) {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.inserted += 1;
    }
}

/// The bit positions of `key` in a stage of `bits` (double hashing over its two halves).
fn positions(key: u64, bits: u64, probes: u64) -> impl Iterator<Item = u64> {
    let (low, high) = (key & 0xffff_ffff, (key >> 32) | 1);
    (0..probes).map(move |i| low.wrapping_add(i.wrapping_mul(high)) % bits)
}

impl Default for IdFilter {
    fn default() -> IdFilter {
        IdFilter {
            stages: vec![Stage::new(0)],
        }
    }
}

impl IdFilter {
    pub fn insert(&mut self, key: u64) {
        if self.may_contain(key) {
            // Already there (or a false positive): counting it again would only grow the filter.
            return;
        }
        let last = self.stages.last().expect("a filter has a stage");
        if last.inserted >= last.capacity {
            self.stages.push(Stage::new(self.stages.len()));
        }
        self.stages.last_mut().expect("a stage").insert(key);
    }

    pub fn may_contain(&self, key: u64) -> bool {
        self.stages.iter().any(|stage| stage.contains(key))
    }

    /// Bytes it holds in memory.
    pub fn heap_bytes(&self) -> usize {
        self.stages.iter().map(|s| s.words.len() * 8).sum()
    }

    fn stored(&self) -> StoredFilter {
        StoredFilter {
            stages: self
                .stages
                .iter()
                .map(|stage| {
                    let bytes: Vec<u8> = stage.words.iter().flat_map(|w| w.to_le_bytes()).collect();
                    StoredStage {
                        capacity: stage.capacity,
                        inserted: stage.inserted,
                        probes: Some(stage.probes),
                        bits: base64::engine::general_purpose::STANDARD.encode(bytes),
                    }
                })
                .collect(),
        }
    }

    /// The filter an index stored; `probes` for a stage that names none.
    fn from_stored(stored: &StoredFilter, probes: u64) -> Option<IdFilter> {
        let stages = stored
            .stages
            .iter()
            .map(|stage| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&stage.bits)
                    .ok()?;
                if bytes.is_empty() || bytes.len() % 8 != 0 {
                    return None;
                }
                let words = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                Some(Stage {
                    words,
                    capacity: stage.capacity,
                    inserted: stage.inserted,
                    probes: stage.probes.unwrap_or(probes),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!stages.is_empty()).then_some(IdFilter { stages })
    }
}

/// A batch's index as the bucket keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchIndex {
    pub version: u32,
    /// Probes per key of a stage that names none ([`PROBES`]).
    pub probes: u64,
    /// Object key → its filter; an object of the batch missing here is read whole.
    pub objects: BTreeMap<String, StoredFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFilter {
    stages: Vec<StoredStage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredStage {
    capacity: u64,
    inserted: u64,
    /// Probes per key it was built with; absent in indexes written before stages differed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    probes: Option<u64>,
    /// The stage's bits, little-endian 64-bit words, base64.
    bits: String,
}

pub const INDEX_VERSION: u32 = 1;

/// The largest filter `forget` puts back for a rewritten object (the archiver keeps none past
/// its own cap either): about a million ids, under the tightening stages as under the fixed
/// ones before them.
const MAX_STORED_FILTER_BYTES: usize = 5 << 19;

impl BatchIndex {
    pub fn new() -> BatchIndex {
        BatchIndex {
            version: INDEX_VERSION,
            probes: PROBES,
            objects: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, key: String, filter: &IdFilter) {
        self.objects.insert(key, filter.stored());
    }

    /// Sets the filter of an object it has one for (an object `forget` rewrote): answers
    /// whether it changed. One grown past a file's cap is dropped instead (the object is then
    /// read whole).
    pub fn replace(&mut self, key: &str, filter: &IdFilter) -> bool {
        let Some(entry) = self.objects.get_mut(key) else {
            return false;
        };
        if filter.heap_bytes() > MAX_STORED_FILTER_BYTES {
            self.objects.remove(key);
            return true;
        }
        let stored = filter.stored();
        let changed = *entry != stored;
        *entry = stored;
        changed
    }

    /// Whether the object at `key` may hold an event of one of the users whose routing keys
    /// are `keys`: `true` unless its filter says it holds none (an object without a filter,
    /// or an index of another format, may hold any).
    pub fn may_hold(&self, key: &str, keys: &[u64]) -> bool {
        if self.version != INDEX_VERSION || self.probes != PROBES {
            return true;
        }
        match self
            .objects
            .get(key)
            .and_then(|stored| IdFilter::from_stored(stored, self.probes))
        {
            Some(filter) => keys.iter().any(|&k| filter.may_contain(k)),
            None => true,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }
}

/// Where the index of batch `[start, end]` goes, beside its manifest:
/// `{prefix}segment-logs/_manifests/_index/{topic}/{partition}/{start:020}-{end:020}.ids.json`
/// (a name no reader takes for a manifest's).
pub fn index_key(prefix: &str, topic: &str, partition: i32, start: i64, end: i64) -> String {
    format!(
        "{prefix}{}/_manifests/_index/{topic}/{partition}/{start:020}-{end:020}.ids.json",
        layout::ROOT
    )
}

/// The index key of the batch whose manifest is at `manifest_key`.
pub fn index_of_manifest(prefix: &str, topic: &str, manifest_key: &str) -> Option<String> {
    let (start, end) = layout::manifest_range(manifest_key)?;
    let rest =
        manifest_key.strip_prefix(&format!("{prefix}{}/_manifests/{topic}/", layout::ROOT))?;
    let partition: i32 = rest.split('/').next()?.parse().ok()?;
    Some(index_key(prefix, topic, partition, start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suppress::key_of;

    #[test]
    fn a_filter_holds_every_key_put_in_it_and_few_others() {
        let mut filter = IdFilter::default();
        for n in 0..20_000 {
            filter.insert(key_of(&format!("user-{n}")));
        }
        assert!((0..20_000).all(|n| filter.may_contain(key_of(&format!("user-{n}")))));
        let false_positives = (0..20_000)
            .filter(|n| filter.may_contain(key_of(&format!("other-{n}"))))
            .count();
        // Nine stages, whose error rates shrink as they grow: 1.5 % in all (a fixed 1 % per
        // stage measured 6.6 % here).
        assert_eq!(filter.stages.len(), 9);
        assert!(false_positives < 20_000 * 2 / 100, "{false_positives}");
        assert!(
            filter.heap_bytes() < 20_000 * 4,
            "{} bytes",
            filter.heap_bytes()
        );
        let small = {
            let mut f = IdFilter::default();
            f.insert(key_of("one"));
            f
        };
        assert!(
            small.heap_bytes() <= 96,
            "a small file's filter stays small: {small:?}"
        );
    }

    /// A reader that probes every stage [`PROBES`] times (the release before stages named
    /// their own) still finds every key of a filter built with more probes, and this release
    /// reads that release's indexes, whose stages name none, with [`PROBES`].
    #[test]
    fn indexes_read_across_releases_miss_no_key() {
        let mut filter = IdFilter::default();
        for n in 0..2_000 {
            filter.insert(key_of(&format!("user-{n}")));
        }
        let mut index = BatchIndex::new();
        index.add("a".into(), &filter);
        let mut json: serde_json::Value = serde_json::from_slice(&index.to_json()).unwrap();
        for stage in json["objects"]["a"]["stages"].as_array_mut().unwrap() {
            assert!(stage["probes"].as_u64().unwrap() > PROBES);
            stage.as_object_mut().unwrap().remove("probes");
        }
        let as_read_before: BatchIndex = serde_json::from_value(json).unwrap();
        assert!((0..2_000).all(|n| as_read_before.may_hold("a", &[key_of(&format!("user-{n}"))])));

        let mut written_before = IdFilter {
            stages: vec![Stage {
                words: vec![0; 80],
                capacity: 512,
                inserted: 0,
                probes: PROBES,
            }],
        };
        for n in 0..500 {
            written_before.stages[0].insert(key_of(&format!("user-{n}")));
        }
        let mut index = BatchIndex::new();
        index.add("b".into(), &written_before);
        let mut json: serde_json::Value = serde_json::from_slice(&index.to_json()).unwrap();
        json["objects"]["b"]["stages"][0]
            .as_object_mut()
            .unwrap()
            .remove("probes");
        let index: BatchIndex = serde_json::from_value(json).unwrap();
        assert!((0..500).all(|n| index.may_hold("b", &[key_of(&format!("user-{n}"))])));
        let false_positives = (0..2_000)
            .filter(|n| index.may_hold("b", &[key_of(&format!("other-{n}"))]))
            .count();
        assert!(
            false_positives < 2_000 / 50,
            "read with seven probes: {false_positives}"
        );
    }

    #[test]
    fn an_index_names_the_objects_that_may_hold_an_id_and_survives_the_bucket() {
        let mut holding = IdFilter::default();
        holding.insert(key_of("user-1"));
        let mut other = IdFilter::default();
        other.insert(key_of("user-2"));
        let mut index = BatchIndex::new();
        index.add("a".into(), &holding);
        index.add("b".into(), &other);
        let index: BatchIndex = serde_json::from_slice(&index.to_json()).unwrap();
        let wanted = [key_of("user-1")];
        assert!(index.may_hold("a", &wanted));
        assert!(!index.may_hold("b", &wanted));
        assert!(index.may_hold("c", &wanted), "no filter: read it");
        let other_format = BatchIndex {
            probes: 3,
            ..index.clone()
        };
        assert!(other_format.may_hold("b", &wanted));
    }

    #[test]
    fn a_record_naming_too_many_ids_leaves_its_keys_unknown() {
        let mut keys = IdKeys::default();
        keys.push("a");
        keys.push("a");
        keys.push("b");
        assert_eq!(keys.keys(), [key_of("a"), key_of("b")]);
        assert!(keys.is_complete());
        for id in ["c", "d", "e"] {
            keys.push(id);
        }
        assert!(!keys.is_complete());
        assert_eq!(
            index_of_manifest("p/", "t", &layout::manifest_key("p/", "t", 3, 10, 20)),
            Some(index_key("p/", "t", 3, 10, 20))
        );
        assert_eq!(
            layout::manifest_range(&index_key("p/", "t", 3, 10, 20)),
            None
        );
    }
}
