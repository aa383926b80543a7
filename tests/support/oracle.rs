//! The exactly-once oracle: what the bucket holds, decompressed, against what was produced.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One past the last offset of each partition.
pub fn end_offsets(records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>) -> BTreeMap<i32, i64> {
    records
        .iter()
        .map(|(&p, offsets)| (p, offsets.keys().next_back().map_or(0, |o| o + 1)))
        .collect()
}

/// The `messageId`s the topic itself holds at more than one offset (a producer's retry the broker
/// wrote twice), with how many copies past the first: the archive holds each offset once, so
/// `verify --deep` rightly finds each of those ids that many times more.
pub fn message_ids_the_topic_repeats(
    records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
) -> HashMap<String, usize> {
    let mut copies: HashMap<String, usize> = HashMap::new();
    for payload in records.values().flat_map(BTreeMap::values) {
        let id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|event| event["messageId"].as_str().map(str::to_string));
        if let Some(id) = id {
            *copies.entry(id).or_default() += 1;
        }
    }
    copies.retain(|_, n| *n > 1);
    copies.values_mut().for_each(|n| *n -= 1);
    copies
}

/// Decompresses a file as exactly one gzip member (as readers that stop after the first member
/// do) and fails if anything follows it.
/// Decompresses a file as exactly one zstd frame and fails if anything follows it.
pub fn unzstd_single_frame(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let frame = zstd::zstd_safe::find_frame_compressed_size(&bytes).unwrap();
    assert_eq!(
        frame,
        bytes.len(),
        "{}: more than one zstd frame",
        path.display()
    );
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(&bytes[..])
        .unwrap()
        .single_frame()
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub fn gunzip_single_member(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let mut decoder = flate2::bufread::GzDecoder::new(&bytes[..]);
    let mut out = Vec::new();
    decoder
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: not a valid gzip member: {e}", path.display()));
    let rest = decoder.into_inner();
    assert!(
        rest.is_empty(),
        "{}: {} bytes follow the first gzip member",
        path.display(),
        rest.len()
    );
    out
}

/// Every file under `dir`, relative path → absolute path.
pub fn files_under(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.insert(relative, path);
            }
        }
    }
    files
}

/// Multiset of byte strings.
pub fn multiset<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> HashMap<&'a [u8], usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts
}

/// One object of the archive, decompressed.
#[derive(Debug)]
pub struct ArchivedObject {
    pub key: String,
    pub source: String,
    pub day: String,
    pub partition: i32,
    pub first_offset: i64,
    pub lines: Vec<Vec<u8>>,
    pub uncompressed_len: usize,
}

/// Parses and decompresses every event object downloaded to `dir` (dead letters and manifests,
/// under `_` folders, are left out).
pub fn archived_objects(dir: &Path, topic: &str) -> Vec<ArchivedObject> {
    let mut objects = Vec::new();
    for (key, path) in files_under(dir) {
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts[0], "segment-logs", "{key}");
        if parts[1].starts_with('_') {
            continue;
        }
        assert_eq!(parts.len(), 4, "unexpected key layout: {key}");
        let (name, zstd) = match (parts[3].strip_suffix(".gz"), parts[3].strip_suffix(".zst")) {
            (Some(name), _) => (name, false),
            (_, Some(name)) => (name, true),
            _ => panic!("{key}: neither .gz nor .zst"),
        };
        let rest = name
            .strip_prefix(&format!("{topic}-"))
            .unwrap_or_else(|| panic!("{key}: name does not start with the topic"));
        let (partition, offset) = rest.split_once('-').expect("partition-offset");
        assert_eq!(
            offset.len(),
            20,
            "{key}: offset not zero-padded to 20 digits"
        );
        let content = if zstd {
            unzstd_single_frame(&path)
        } else {
            gunzip_single_member(&path)
        };
        assert!(content.ends_with(b"\n"), "{key}: last line not terminated");
        let lines: Vec<Vec<u8>> = content[..content.len() - 1]
            .split(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        objects.push(ArchivedObject {
            source: parts[1].to_string(),
            day: parts[2].to_string(),
            partition: partition.parse().expect("partition number"),
            first_offset: offset.parse().expect("offset number"),
            uncompressed_len: content.len(),
            key,
            lines,
        });
    }
    objects
}

/// Checks that the archive holds every record of `records` below `upto` (all when `None`)
/// exactly once, in the object its source, received-day, partition and offsets call for.
pub fn assert_exactly_once(
    objects: &[ArchivedObject],
    records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
    upto: Option<&BTreeMap<i32, i64>>,
) {
    assert_archived(objects, records, upto, None);
}

/// What retention deleted from a topic while it was archived: per partition, the log's start
/// once everything was archived, the ranges manifests report as deleted before archived, and
/// where the archive of the partition began (the first position the group committed for it:
/// what retention deleted before any member held the partition, the archive never needed).
pub struct Deleted {
    pub log_starts: BTreeMap<i32, i64>,
    pub reported: BTreeMap<i32, Vec<(i64, i64)>>,
    pub archive_starts: BTreeMap<i32, i64>,
}

/// [`assert_exactly_once`] for a topic retention deleted from: a record below the log's start
/// may be missing only inside a range reported as deleted, and an object may begin after the
/// offset its key names when the records between were deleted (a replay cuts where its first
/// attempt did).
pub fn assert_exactly_once_or_deleted(
    objects: &[ArchivedObject],
    records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
    deleted: &Deleted,
) {
    assert_archived(objects, records, None, Some(deleted));
}

fn assert_archived(
    objects: &[ArchivedObject],
    records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
    upto: Option<&BTreeMap<i32, i64>>,
    deleted: Option<&Deleted>,
) {
    let log_start =
        |partition: i32| deleted.map_or(0, |d| d.log_starts.get(&partition).copied().unwrap_or(0));
    let archive_start = |partition: i32| {
        deleted.map_or(0, |d| {
            d.archive_starts.get(&partition).copied().unwrap_or(0)
        })
    };
    let reported = |partition: i32, offset: i64| {
        deleted.is_some_and(|d| {
            d.reported
                .get(&partition)
                .is_some_and(|ranges| ranges.iter().any(|&(a, b)| a <= offset && offset <= b))
        })
    };
    let mut where_from: HashMap<&[u8], (i32, i64)> = HashMap::new();
    for (&partition, offsets) in records {
        for (&offset, payload) in offsets {
            let previous = where_from.insert(payload.as_slice(), (partition, offset));
            assert!(
                previous.is_none(),
                "the producer wrote the same payload twice"
            );
        }
    }
    let mut seen: BTreeMap<i32, BTreeMap<i64, usize>> = BTreeMap::new();
    for object in objects {
        let mut previous = None;
        for (index, line) in object.lines.iter().enumerate() {
            let &(partition, offset) = where_from.get(line.as_slice()).unwrap_or_else(|| {
                let at_first = records
                    .get(&object.partition)
                    .and_then(|offsets| offsets.get(&object.first_offset));
                panic!(
                    "{}: line {index} is not a produced event: {}\n(the topic holds at offset {}: {})",
                    object.key,
                    String::from_utf8_lossy(line),
                    object.first_offset,
                    at_first.map_or("nothing".into(), |p| String::from_utf8_lossy(p).to_string())
                )
            });
            assert_eq!(
                partition, object.partition,
                "{}: record of another partition",
                object.key
            );
            if index == 0
                && !(offset > object.first_offset && object.first_offset < log_start(partition))
            {
                assert_eq!(
                    offset, object.first_offset,
                    "{}: key names the wrong first offset",
                    object.key
                );
            }
            assert!(
                previous < Some(offset),
                "{}: offsets out of order",
                object.key
            );
            previous = Some(offset);
            *seen
                .entry(partition)
                .or_default()
                .entry(offset)
                .or_insert(0) += 1;

            let event: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(
                event["projectId"].as_str(),
                Some(object.source.as_str()),
                "{}",
                object.key
            );
            let received =
                chrono::DateTime::parse_from_rfc3339(event["receivedAt"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&chrono::Utc);
            let midnight = received
                .date_naive()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc();
            // Any of the day formats: members with other rules may share a bucket.
            let day = received.date_naive();
            let folders = [
                (midnight.timestamp() * 1000).to_string(),
                day.format("%Y-%m-%d").to_string(),
                day.format("day=%Y-%m-%d").to_string(),
            ];
            assert!(
                folders.contains(&object.day),
                "{}: event received {received} is in the wrong day folder",
                object.key
            );
        }
    }
    for (&partition, offsets) in records {
        let limit = upto.map_or(i64::MAX, |u| u.get(&partition).copied().unwrap_or(0));
        let seen_here = seen.remove(&partition).unwrap_or_default();
        let duplicated: Vec<_> = seen_here
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(o, _)| *o)
            .collect();
        assert!(
            duplicated.is_empty(),
            "partition {partition}: offsets archived twice: {duplicated:?}"
        );
        let missing: Vec<i64> = offsets
            .keys()
            .filter(|&&o| o < limit && !seen_here.contains_key(&o))
            .filter(|&&o| !(o < log_start(partition) && reported(partition, o)))
            .filter(|&&o| !(o < log_start(partition) && o < archive_start(partition)))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: {} offsets missing, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        let extra: Vec<&i64> = seen_here.keys().filter(|&&o| o >= limit).collect();
        assert!(
            extra.is_empty(),
            "partition {partition}: offsets at or past {limit} archived: {extra:?}"
        );
    }
}
