//! Layout: where things live, in the bucket and on the local volume — the destination of a
//! record (its source and received-day folder, or the dead letter), the rules that may name a
//! source, and every key and path. Every name is a pure function of topic, partition,
//! destination and offsets, so a replay rewrites the same keys.

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// Which file of a batch a record belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Destination {
    Events {
        source: String,
        day: String,
    },
    /// Dead letters are grouped by the day of their Kafka timestamp (`unknown` without one).
    DeadLetter {
        day: String,
    },
}

impl Destination {
    /// The folder of this destination under `{prefix}segment-logs/`.
    pub fn folder(&self, topic: &str) -> String {
        match self {
            Destination::Events { source, day } => format!("{source}/{day}"),
            Destination::DeadLetter { day } => format!("_dead-letter/{topic}/{day}"),
        }
    }
}

/// How the received-day folder is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DayFormat {
    /// Milliseconds since the epoch of UTC midnight (`1432684800000`), Segment's own.
    EpochMs,
    /// `2015-05-27`.
    Date,
    /// `day=2015-05-27`, for Hive-style partition discovery.
    Hive,
}

impl DayFormat {
    pub fn format(self, day: NaiveDate) -> String {
        match self {
            DayFormat::EpochMs => {
                let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
                (midnight.and_utc().timestamp() * 1000).to_string()
            }
            DayFormat::Date => day.format("%Y-%m-%d").to_string(),
            DayFormat::Hive => day.format("day=%Y-%m-%d").to_string(),
        }
    }
}

/// One step of the source-id chain, written `kind:argument` in the configuration (and in the
/// cutting rules stored in the bucket, whose hash depends on that spelling).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SourceRule {
    Header(String),
    Field(String),
    /// Reads this field and maps its value through `routing.write_keys`.
    WriteKey(String),
    Static(String),
}

impl SourceRule {
    pub fn parse(rule: &str) -> Result<SourceRule, String> {
        let (kind, arg) = rule.split_once(':').ok_or_else(|| {
            format!("{rule:?} must be header:NAME, field:NAME, write-key:FIELD or static:ID")
        })?;
        if arg.is_empty() {
            return Err(format!("{rule:?} names nothing after ':'"));
        }
        match kind {
            "header" => Ok(SourceRule::Header(arg.into())),
            "field" => Ok(SourceRule::Field(arg.into())),
            "write-key" => Ok(SourceRule::WriteKey(arg.into())),
            "static" => match check_source_id(arg) {
                Ok(()) => Ok(SourceRule::Static(arg.into())),
                Err(reason) => Err(format!("{rule:?}: source id {reason}")),
            },
            _ => Err(format!(
                "{rule:?}: unknown kind {kind:?} (header, field, write-key, static)"
            )),
        }
    }
}

impl std::fmt::Display for SourceRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, argument) = match self {
            SourceRule::Header(name) => ("header", name),
            SourceRule::Field(name) => ("field", name),
            SourceRule::WriteKey(field) => ("write-key", field),
            SourceRule::Static(id) => ("static", id),
        };
        write!(f, "{kind}:{argument}")
    }
}

impl TryFrom<String> for SourceRule {
    type Error = String;

    fn try_from(rule: String) -> Result<SourceRule, String> {
        SourceRule::parse(&rule)
    }
}

impl From<SourceRule> for String {
    fn from(rule: SourceRule) -> String {
        rule.to_string()
    }
}

/// Longest source id accepted as a folder name.
pub const MAX_SOURCE_ID_LEN: usize = 128;

/// A source id becomes a folder under `segment-logs/`: it must not escape it, hide as a
/// `_`-prefixed folder, or make a key S3 rejects. Allowed: 1-128 of `[A-Za-z0-9._-]`, not
/// starting with `_` or `.`.
pub fn check_source_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.len() > MAX_SOURCE_ID_LEN {
        return Err("is longer than 128 characters");
    }
    if id.starts_with('_') || id.starts_with('.') {
        return Err("starts with '_' or '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("has characters outside [A-Za-z0-9._-]");
    }
    Ok(())
}

/// How an object is compressed: what its key ends with and how readers open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// One gzip member, as Segment writes its logs (`.gz`).
    #[default]
    Gzip,
    /// One zstd frame (`.zst`).
    Zstd,
}

impl Codec {
    pub fn extension(self) -> &'static str {
        match self {
            Codec::Gzip => ".gz",
            Codec::Zstd => ".zst",
        }
    }

    pub fn is_gzip(&self) -> bool {
        *self == Codec::Gzip
    }

    /// The codec a key's extension names, if any.
    pub fn of_key(key: &str) -> Option<Codec> {
        if key.ends_with(".gz") {
            Some(Codec::Gzip)
        } else if key.ends_with(".zst") {
            Some(Codec::Zstd)
        } else {
            None
        }
    }
}

/// The folder every object lives under, after the optional prefix.
/// The day folder of dead letters whose record has no Kafka timestamp to date them by.
pub const UNDATED_DAY: &str = "unknown";

pub const ROOT: &str = "segment-logs";

/// Object key of the file whose first record is `first_offset`:
/// `{prefix}segment-logs/{source}/{day}/{topic}-{partition}-{first_offset:020}.gz` (`.zst` for
/// zstd objects).
/// Each offset lives in exactly one file, so keys never collide across batches.
pub fn object_key(
    prefix: &str,
    topic: &str,
    partition: i32,
    destination: &Destination,
    first_offset: i64,
    codec: Codec,
) -> String {
    format!(
        "{prefix}{ROOT}/{}/{}",
        destination.folder(topic),
        object_name(topic, partition, first_offset, codec)
    )
}

/// File name part of a key; also the local file name inside a batch directory.
pub fn object_name(topic: &str, partition: i32, first_offset: i64, codec: Codec) -> String {
    format!(
        "{topic}-{partition}-{first_offset:020}{}",
        codec.extension()
    )
}

/// The partition and first offset an object's file name gives when it is one of `topic`'s
/// ([`object_name`]); `None` otherwise, also for a topic whose name starts with this one's
/// (`events-eu-3-…` is not an object of `events`).
pub fn parse_object_name(topic: &str, name: &str) -> Option<(i32, i64)> {
    let numbers = name
        .strip_suffix(Codec::Gzip.extension())
        .or_else(|| name.strip_suffix(Codec::Zstd.extension()))?
        .strip_prefix(topic)?
        .strip_prefix('-')?;
    let (partition, offset) = numbers.split_once('-')?;
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits(partition) || !digits(offset) {
        return None;
    }
    Some((partition.parse().ok()?, offset.parse().ok()?))
}

/// Where a partition's newest batch intent is kept in the bucket as well as in the group's
/// commit: `{prefix}segment-logs/_manifests/_intents/{topic}/{partition}.json`, beside the
/// cutting rules. Losing the group's offsets (expired, a renamed `group.id`) then loses no
/// intent: the next owner replays the batch the bucket names instead of cutting its range again.
pub fn intent_key(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}{ROOT}/_manifests/_intents/{topic}/{partition}.json")
}

/// Where the files a batch is cut into are kept before its intent is committed, named by their
/// hash (`pipeline::plan_hash`):
/// `{prefix}segment-logs/_manifests/_plans/{topic}/{partition}/{start:020}-{end:020}-{hash}.json`.
/// Content-addressed, so the member that records an intent cannot overwrite the plan of another
/// attempt of the same range, and whoever replays the intent reads the very plan it names.
pub fn plan_key(
    prefix: &str,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    hash: &str,
) -> String {
    format!(
        "{prefix}{ROOT}/_manifests/_plans/{topic}/{partition}/{start:020}-{end:020}-{hash}.json"
    )
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

/// A partition's uploaded files, emptied and kept to be renamed into the next batch instead of
/// created anew (`buffer::partition`); not a batch, so a resume removes it with other leftovers.
pub fn spare_dir(partition_dir: &Path) -> PathBuf {
    partition_dir.join("spare")
}

/// Creates (or truncates) a local file readable by this user only: buffers and checkpoints hold
/// raw events, with their user ids, emails and IP addresses.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates the data directory if needed and makes it this user's only (`0700`), so that nothing
/// below it (batch folders, files made before this release) can be read by other users. A
/// mount point this user does not own (a Kubernetes volume owned by root, shared through
/// `fsGroup`) cannot be changed: `Ok(false)`, and the files themselves are still `0600`.
pub fn prepare_data_dir(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path)?;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn local_data_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_data_dir(&data).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        let file = data.join("f.gz");
        std::fs::write(&file, b"old").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let new = data.join("new.gz");
        create_private_file(&new).unwrap();
        assert_eq!(mode(&new), 0o600);
        create_private_file(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"", "truncated");
    }

    use super::*;

    #[test]
    fn keys_follow_the_segment_layout() {
        let events = Destination::Events {
            source: "src1".into(),
            day: "1432684800000".into(),
        };
        assert_eq!(
            object_key("", "events", 3, &events, 42, Codec::Gzip),
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
                7,
                Codec::Gzip
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
        assert!(
            object_key("", "t", 1, &d, 9, Codec::Gzip)
                < object_key("", "t", 1, &d, 10, Codec::Gzip)
        );
        assert_eq!(
            object_name("t", 1, 9, Codec::Zstd),
            "t-1-00000000000000000009.zst"
        );
    }
}
