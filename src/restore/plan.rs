//! The plan of a restore: which archived objects a selection covers, in the order their lines
//! are sent. A plan is made once, by the first run of a restore, and stored in the bucket
//! (`{prefix}segment-logs/_restores/{run}.json`): every later run of the same restore sends from
//! the same list in the same order, so objects archived meanwhile can neither slip in before
//! lines already sent nor make a resumed run skip them.

use std::collections::BTreeSet;

use chrono::{NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::layout::{self, check_source_id};

/// What to send back: events of some sources and days, or dead letters of some days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The topic the archive was made from (`kafka.topic`): object names start with it.
    pub archived_topic: String,
    /// Source ids to restore; empty for every source.
    pub sources: BTreeSet<String>,
    /// First and last received-day, inclusive.
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// Dead letters instead of events.
    pub dead_letter: bool,
    /// With `dead_letter`: only these reasons (e.g. `no-source`); empty for all.
    pub reasons: BTreeSet<String>,
    /// With `dead_letter`: also the letters of records without a Kafka timestamp, filed under
    /// the day folder `unknown` (`layout::UNDATED_DAY`) whatever the days selected.
    pub undated: bool,
}

/// One object of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedObject {
    pub key: String,
    pub bytes: i64,
    /// The source folder (events only): set as the `source-id` header of each line sent.
    pub source: Option<String>,
    /// `None`: the `unknown` folder of dead letters without a Kafka timestamp.
    pub day: Option<NaiveDate>,
}

/// The objects of a restore, in sending order, and where they go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// Names the restore in every message it sends (see `position.rs`).
    pub run: String,
    pub target_topic: String,
    /// Partitions of the target topic when the plan was made: lines are placed by their key
    /// over this many partitions, on every run.
    pub partitions: i32,
    pub objects: Vec<PlannedObject>,
    /// The key this run signs its position headers with, hex (see `position.rs`); absent in
    /// plans made before positions were signed, whose runs go on unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_key: Option<String>,
    /// `--key-field`s the run keys events by, which pick each line's partition: a rerun with
    /// others would look for lines where they were never sent. Absent in earlier plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fields: Option<Vec<String>>,
    /// Objects of the selection that no batch manifest lists, left out (see
    /// [`manifests_of`]): said again by every run of the restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

impl Plan {
    /// How this run marks what it sends.
    pub fn marker(&self) -> Result<super::position::RunMarker, String> {
        let key = match &self.position_key {
            None => None,
            Some(hex) => Some(
                super::position::from_hex(hex)
                    .filter(|key| !key.is_empty())
                    .ok_or("position_key is not hex")?,
            ),
        };
        Ok(super::position::RunMarker::new(&self.run, key))
    }
}

pub const PLAN_VERSION: u32 = 1;

/// Where the plan of `run` is stored.
pub fn plan_key(prefix: &str, run: &str) -> String {
    format!("{prefix}{}/_restores/{run}.json", layout::ROOT)
}

/// Where a restore keeps the last position acknowledged in each partition (`delivery.rs`).
pub fn acknowledged_key(prefix: &str, run: &str) -> String {
    format!("{prefix}{}/_restores/{run}.acknowledged.json", layout::ROOT)
}

/// The name of a restore: the same selection into the same topic is the same restore (a rerun
/// resumes it), anything else is another one.
pub fn run_name(selection: &Selection, prefix: &str, target_topic: &str) -> String {
    use md5::Digest as _;
    let mut hasher = md5::Md5::new();
    let text = format!(
        "v1\n{prefix}\n{}\n{target_topic}\n{:?}\n{}\n{}\n{}\n{:?}",
        selection.archived_topic,
        selection.sources,
        selection.from,
        selection.to,
        selection.dead_letter,
        selection.reasons
    );
    hasher.update(text.as_bytes());
    // Only when set, so every restore named before it existed keeps its name.
    if selection.undated {
        hasher.update(b"\nundated");
    }
    let digest = hasher.finalize();
    super::position::to_hex(&digest[..8])
}

/// A day as the archive names its folders (`1432684800000`, `2015-05-27`, `day=2015-05-27`);
/// also what `--from` and `--to` take.
pub fn parse_day(text: &str) -> Option<NaiveDate> {
    let text = text.strip_prefix("day=").unwrap_or(text);
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(date);
    }
    let millis: i64 = text.parse().ok()?;
    if millis % 86_400_000 != 0 {
        return None;
    }
    Utc.timestamp_millis_opt(millis)
        .single()
        .map(|t| t.date_naive())
}

/// Where an object of the archive sits: source (`None` for a dead letter), day (`None`: an
/// undated dead letter's), partition and first offset; the order of these is the sending order.
pub type Place = (Option<String>, Option<NaiveDate>, i32, i64);

/// The place of `key`, or `None` for keys that are not archived objects of `topic`.
pub fn place(root: &str, topic: &str, key: &str) -> Option<Place> {
    let rest = key.strip_prefix(root)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (source, day, name) = match parts.as_slice() {
        ["_dead-letter", letter_topic, day, name] if *letter_topic == topic => (None, day, name),
        [source, day, name] if check_source_id(source).is_ok() => {
            (Some(source.to_string()), day, name)
        }
        _ => return None,
    };
    let (partition, offset) = layout::parse_object_name(topic, name)?;
    let day = match parse_day(day) {
        Some(day) => Some(day),
        None if source.is_none() && *day == layout::UNDATED_DAY => None,
        None => return None,
    };
    Some((source, day, partition, offset))
}

/// The objects of `listing` (key, size) that `selection` covers, in sending order: by source,
/// day, partition and first offset, so each partition's lines go in the order Kafka had them.
pub fn select(
    prefix: &str,
    selection: &Selection,
    listing: impl IntoIterator<Item = (String, i64)>,
) -> Vec<PlannedObject> {
    let root = format!("{prefix}{}/", layout::ROOT);
    let mut chosen: Vec<(Place, PlannedObject)> = listing
        .into_iter()
        .filter_map(|(key, bytes)| {
            let place = place(&root, &selection.archived_topic, &key)?;
            let (source, day) = (place.0.clone(), place.1);
            let dated = match day {
                Some(day) => (selection.from..=selection.to).contains(&day),
                None => selection.undated,
            };
            let wanted = source.is_none() == selection.dead_letter
                && dated
                && source.as_ref().is_none_or(|source| {
                    selection.sources.is_empty() || selection.sources.contains(source)
                });
            wanted.then(|| {
                let object = PlannedObject {
                    key,
                    bytes,
                    source,
                    day,
                };
                (place, object)
            })
        })
        .collect();
    chosen.sort_by(|a, b| a.0.cmp(&b.0));
    chosen.into_iter().map(|(_, object)| object).collect()
}

/// The manifests of the selected objects' batches: for each object, the listing's manifest
/// whose range covers its first offset (none for a batch still uploading). Restoring what those
/// manifests list, not everything the listing holds, leaves out strays (an interrupted
/// attempt's objects, copies made by hand) whose lines the listed objects already hold.
pub fn manifests_of(
    prefix: &str,
    topic: &str,
    listing: &[(String, i64)],
    objects: &[PlannedObject],
) -> BTreeSet<String> {
    let ranges = ManifestRanges::of(prefix, topic, listing);
    objects
        .iter()
        .filter_map(|object| ranges.covering(&object.key))
        .map(str::to_string)
        .collect()
}

/// The batch manifests of a listing, per partition, by the ranges their keys name.
pub struct ManifestRanges<'l> {
    root: String,
    topic: String,
    ranges: std::collections::HashMap<i32, Vec<(i64, i64, &'l str)>>,
}

impl<'l> ManifestRanges<'l> {
    pub fn of(prefix: &str, topic: &str, listing: &'l [(String, i64)]) -> ManifestRanges<'l> {
        let root = format!("{prefix}{}/", layout::ROOT);
        let manifest_root = format!("{root}_manifests/{topic}/");
        let mut ranges: std::collections::HashMap<i32, Vec<(i64, i64, &str)>> = Default::default();
        for (key, _) in listing {
            let Some(rest) = key.strip_prefix(&manifest_root) else {
                continue;
            };
            let partition = rest.split('/').next().and_then(|p| p.parse::<i32>().ok());
            if let (Some(partition), Some((start, end))) = (partition, layout::manifest_range(key))
            {
                ranges.entry(partition).or_default().push((start, end, key));
            }
        }
        for list in ranges.values_mut() {
            list.sort_unstable();
        }
        ManifestRanges {
            root,
            topic: topic.to_string(),
            ranges,
        }
    }

    /// The manifest whose range covers the first offset of the object at `key`.
    pub fn covering(&self, key: &str) -> Option<&'l str> {
        let (_, _, partition, offset) = place(&self.root, &self.topic, key)?;
        let list = self.ranges.get(&partition)?;
        let after = list.partition_point(|(start, _, _)| *start <= offset);
        let (_, end, key) = list.get(after.checked_sub(1)?)?;
        (offset <= *end).then_some(*key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(sources: &[&str], from: &str, to: &str) -> Selection {
        Selection {
            archived_topic: "events".into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            from: parse_day(from).unwrap(),
            to: parse_day(to).unwrap(),
            dead_letter: false,
            reasons: BTreeSet::new(),
            undated: false,
        }
    }

    #[test]
    fn each_object_is_matched_to_the_manifest_whose_range_covers_it() {
        let listing: Vec<(String, i64)> = [
            "segment-logs/_manifests/events/0/00000000000000000000-00000000000000000099.json",
            "segment-logs/_manifests/events/0/00000000000000000100-00000000000000000199.json",
            "segment-logs/_manifests/events/1/00000000000000000000-00000000000000000049.json",
            "segment-logs/_manifests/other/0/00000000000000000000-00000000000000099999.json",
        ]
        .iter()
        .map(|k| (k.to_string(), 10))
        .collect();
        let object = |key: &str| PlannedObject {
            key: key.into(),
            bytes: 1,
            source: Some("web".into()),
            day: parse_day("2015-05-27"),
        };
        let objects = [
            object("segment-logs/web/1432684800000/events-0-00000000000000000100.gz"),
            object("segment-logs/web/1432684800000/events-0-00000000000000000101.gz"),
            // Past every manifest of partition 1: a batch still uploading.
            object("segment-logs/web/1432684800000/events-1-00000000000000000050.gz"),
        ];
        let manifests = manifests_of("", "events", &listing, &objects);
        assert_eq!(
            manifests.into_iter().collect::<Vec<_>>(),
            ["segment-logs/_manifests/events/0/00000000000000000100-00000000000000000199.json"]
        );
    }

    #[test]
    fn days_are_read_in_every_folder_format() {
        let day = NaiveDate::from_ymd_opt(2015, 5, 27).unwrap();
        assert_eq!(parse_day("2015-05-27"), Some(day));
        assert_eq!(parse_day("day=2015-05-27"), Some(day));
        assert_eq!(parse_day("1432684800000"), Some(day));
        assert_eq!(parse_day("1432684800001"), None);
        assert_eq!(parse_day("yesterday"), None);
    }

    #[test]
    fn a_selection_takes_its_sources_and_days_in_kafka_order() {
        let listing = [
            "segment-logs/web/2015-05-27/events-10-00000000000000000000.gz",
            "segment-logs/web/2015-05-27/events-2-00000000000000000500.gz",
            "segment-logs/web/2015-05-27/events-2-00000000000000000040.gz",
            "segment-logs/web/2015-05-28/events-0-00000000000000000000.gz",
            "segment-logs/web/2015-05-29/events-0-00000000000000000000.gz",
            "segment-logs/ios/day=2015-05-27/events-0-00000000000000000000.gz",
            "segment-logs/android/2015-05-27/events-0-00000000000000000000.gz",
            "segment-logs/web/2015-05-27/other-0-00000000000000000000.gz",
            "segment-logs/_dead-letter/events/2015-05-27/events-0-00000000000000000007.gz",
            "segment-logs/_manifests/events/0/00000000000000000000-00000000000000000099.json",
            "segment-logs/_restores/abc.json",
        ]
        .map(|k| (k.to_string(), 10));
        let chosen = select(
            "",
            &selection(&["web", "ios"], "2015-05-27", "1432771200000"),
            listing.clone(),
        );
        let keys: Vec<&str> = chosen.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "segment-logs/ios/day=2015-05-27/events-0-00000000000000000000.gz",
                "segment-logs/web/2015-05-27/events-2-00000000000000000040.gz",
                "segment-logs/web/2015-05-27/events-2-00000000000000000500.gz",
                "segment-logs/web/2015-05-27/events-10-00000000000000000000.gz",
                "segment-logs/web/2015-05-28/events-0-00000000000000000000.gz",
            ]
        );
        assert_eq!(chosen[0].source.as_deref(), Some("ios"));

        let mut letters = selection(&[], "2015-05-27", "2015-05-27");
        letters.dead_letter = true;
        let chosen = select("", &letters, listing.clone());
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].source, None);
    }

    /// A record without a Kafka timestamp is dead-lettered under the day folder `unknown`: no
    /// `--from`/`--to` reaches it, `--undated` does (before: no restore could select it).
    #[test]
    fn dead_letters_without_a_timestamp_are_selected_with_undated() {
        let listing = [
            "segment-logs/_dead-letter/events/unknown/events-0-00000000000000000003.gz",
            "segment-logs/_dead-letter/events/2015-05-27/events-0-00000000000000000007.gz",
            "segment-logs/web/unknown/events-0-00000000000000000000.gz",
        ]
        .map(|k| (k.to_string(), 10));
        let mut letters = selection(&[], "2015-05-27", "2015-05-27");
        letters.dead_letter = true;
        let keys = |selection: &Selection| -> Vec<String> {
            select("", selection, listing.clone())
                .into_iter()
                .map(|o| o.key)
                .collect()
        };
        assert_eq!(
            keys(&letters),
            ["segment-logs/_dead-letter/events/2015-05-27/events-0-00000000000000000007.gz"]
        );
        let dated_name = run_name(&letters, "", "t");
        letters.undated = true;
        assert_eq!(
            keys(&letters),
            [
                "segment-logs/_dead-letter/events/unknown/events-0-00000000000000000003.gz",
                "segment-logs/_dead-letter/events/2015-05-27/events-0-00000000000000000007.gz",
            ]
        );
        assert_ne!(run_name(&letters, "", "t"), dated_name);
    }

    #[test]
    fn the_same_selection_into_the_same_topic_is_the_same_restore() {
        let a = selection(&["web"], "2015-05-27", "2015-05-28");
        assert_eq!(run_name(&a, "", "t"), run_name(&a.clone(), "", "t"));
        assert_ne!(run_name(&a, "", "t"), run_name(&a, "", "u"));
        let b = selection(&["web", "ios"], "2015-05-27", "2015-05-28");
        assert_ne!(run_name(&a, "", "t"), run_name(&b, "", "t"));
        assert_eq!(
            plan_key("team/", "0123"),
            "team/segment-logs/_restores/0123.json"
        );
    }
}
