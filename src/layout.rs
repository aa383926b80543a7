//! Layout: where things live, in the bucket and on the local volume. Every name is a pure
//! function of topic, partition, destination and offsets, so a replay rewrites the same keys.

use std::path::{Path, PathBuf};

use crate::route::Destination;

/// The folder every object lives under, after the optional prefix.
pub const ROOT: &str = "segment-logs";

/// Object key of the file whose first record is `first_offset`:
/// `{prefix}segment-logs/{source}/{day}/{topic}-{partition}-{first_offset:020}.gz`.
/// Each offset lives in exactly one file, so keys never collide across batches.
pub fn object_key(
    prefix: &str,
    topic: &str,
    partition: i32,
    destination: &Destination,
    first_offset: i64,
) -> String {
    format!(
        "{prefix}{ROOT}/{}/{}",
        destination.folder(topic),
        object_name(topic, partition, first_offset)
    )
}

/// File name part of a key; also the local file name inside a batch directory.
pub fn object_name(topic: &str, partition: i32, first_offset: i64) -> String {
    format!("{topic}-{partition}-{first_offset:020}.gz")
}

/// Where the manifest of batch `[start, end]` goes:
/// `{prefix}segment-logs/_manifests/{topic}/{partition}/{start:020}-{end:020}.json`.
pub fn manifest_key(prefix: &str, topic: &str, partition: i32, start: i64, end: i64) -> String {
    format!(
        "{}{start:020}-{end:020}.json",
        manifest_prefix(prefix, topic, partition)
    )
}

/// The `[start, end]` a manifest key names, if it is one (the inverse of [`manifest_key`]).
pub fn manifest_range(key: &str) -> Option<(i64, i64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".json")?;
    let (start, end) = name.split_once('-')?;
    if start.len() != 20 || end.len() != 20 {
        return None;
    }
    Some((start.parse().ok()?, end.parse().ok()?))
}

/// The folder holding a partition's manifests.
pub fn manifest_prefix(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}{ROOT}/_manifests/{topic}/{partition}/")
}

/// A partition's local directory: its checkpoint and one directory per batch.
pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// A batch's local directory, named by the first offset it covers.
pub fn batch_dir(partition_dir: &Path, batch_start: i64) -> PathBuf {
    partition_dir.join(format!("batch-{batch_start:020}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_segment_layout() {
        let events = Destination::Events {
            source: "src1".into(),
            day: "1432684800000".into(),
        };
        assert_eq!(
            object_key("", "events", 3, &events, 42),
            "segment-logs/src1/1432684800000/events-3-00000000000000000042.gz"
        );
        assert_eq!(
            object_key(
                "team/",
                "events",
                0,
                &Destination::DeadLetter {
                    day: "2015-05-27".into()
                },
                7
            ),
            "team/segment-logs/_dead-letter/events/2015-05-27/events-0-00000000000000000007.gz"
        );
    }

    #[test]
    fn manifests_live_in_an_underscore_folder() {
        assert_eq!(
            manifest_key("", "events", 2, 100, 199),
            "segment-logs/_manifests/events/2/00000000000000000100-00000000000000000199.json"
        );
    }

    #[test]
    fn manifest_keys_name_their_range() {
        let key = manifest_key("p/", "events", 2, 100, 199);
        assert_eq!(manifest_range(&key), Some((100, 199)));
        assert_eq!(
            manifest_range("segment-logs/_manifests/events/2/notes.json"),
            None
        );
        assert_eq!(
            manifest_range("segment-logs/_manifests/events/2/1-2.json"),
            None
        );
    }

    #[test]
    fn keys_sort_by_offset() {
        let d = Destination::DeadLetter { day: "x".into() };
        assert!(object_key("", "t", 1, &d, 9) < object_key("", "t", 1, &d, 10));
    }
}
