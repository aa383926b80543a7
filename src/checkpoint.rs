//! Checkpoint: a partition's local durable state — sealed batches not yet committed, the open
//! batch's files with their flushed lengths, CRC32s and sizes, and the next offset to read — and
//! the decision, at assignment, whether to resume from it or fall back to the committed offset.
//!
//! The file is written atomically (temp file, fsync, rename, fsync of the directory), after the
//! data files it describes were fsynced, so whatever checkpoint is found after a crash describes
//! bytes that are on disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::Codec;
use crate::layout::Destination;

const FILE_NAME: &str = "checkpoint.json";
const FORMAT_VERSION: u32 = 1;

/// The durable state of a file at its last sync-flush: enough to truncate and continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// Bytes of the file that hold a valid, byte-aligned deflate prefix (header included).
    pub compressed_len: u64,
    /// CRC32 of all uncompressed bytes so far.
    pub crc32: u32,
    /// Uncompressed bytes so far.
    pub uncompressed_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    pub topic: String,
    pub partition: i32,
    /// The next offset to read from Kafka after resuming.
    pub next_offset: i64,
    /// Sealed batches whose commit is not known yet, oldest first.
    pub sealed: Vec<BatchState>,
    /// The batch still taking records; `None` when nothing is buffered.
    pub open: Option<BatchState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchState {
    /// First offset the batch covers: the position it started at.
    pub start: i64,
    /// Last offset the batch holds.
    pub end: i64,
    pub files: Vec<FileState>,
    /// Unix ms when its first record was read, for the oldest-unuploaded-record age.
    #[serde(default)]
    pub first_read_ms: Option<i64>,
    /// Offsets of `[start, end]` that hold no record.
    #[serde(default)]
    pub gaps: Vec<Gap>,
    /// Hash of the cutting rules its files are cut with (`rules`); empty when an earlier
    /// release wrote the checkpoint.
    #[serde(default)]
    pub rules: String,
}

/// A range of offsets inside a batch that holds no record, and why: each offset of a batch
/// `[start, end]` is either a record in one of its files or in one of its gaps, so a batch
/// accounts for every offset (`verify` checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first: i64,
    pub last: i64,
    pub cause: GapCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GapCause {
    /// Kafka delivered no record there: compacted away, transaction markers, aborted
    /// transactions.
    NoRecord,
    /// Deleted from the log (retention, DeleteRecords) before the archiver read it: lost to the
    /// archive.
    Deleted,
    /// A record of a suppressed user (`suppress`): left out of the archive on purpose.
    Suppressed,
}

impl GapCause {
    /// Its name in manifests and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            GapCause::NoRecord => "no-record",
            GapCause::Deleted => "deleted",
            GapCause::Suppressed => "suppressed",
        }
    }
}

impl Gap {
    /// How many offsets it spans (never zero: `first <= last`).
    pub fn offsets(&self) -> u64 {
        (self.last - self.first + 1) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub destination: Destination,
    pub first_offset: i64,
    pub records: u64,
    /// For a sealed batch the finished object; for the open batch the last sync-flush.
    pub stream: StreamState,
    /// Whether later records of its destination still go to this file (it was not cut).
    pub accepting: bool,
    /// How a sealed file is compressed (open files are always gzip).
    #[serde(default, skip_serializing_if = "Codec::is_gzip")]
    pub codec: Codec,
}

impl Checkpoint {
    pub fn new(topic: &str, partition: i32, next_offset: i64) -> Checkpoint {
        Checkpoint {
            version: FORMAT_VERSION,
            topic: topic.to_string(),
            partition,
            next_offset,
            sealed: Vec::new(),
            open: None,
        }
    }

    /// Every batch it holds, sealed ones first.
    pub fn batches(&self) -> impl Iterator<Item = &BatchState> {
        self.sealed.iter().chain(self.open.as_ref())
    }

    /// Where the earliest buffered batch starts, if anything is buffered.
    pub fn first_start(&self) -> Option<i64> {
        self.sealed
            .first()
            .or(self.open.as_ref())
            .map(|batch| batch.start)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read checkpoint {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("checkpoint {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes the checkpoint of `partition_dir` atomically and durably.
pub fn write(partition_dir: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let path = partition_dir.join(FILE_NAME);
    let tmp = partition_dir.join(format!("{FILE_NAME}.tmp"));
    let wrap = |source| CheckpointError::Write {
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(checkpoint).expect("checkpoint serializes");
    let mut file = crate::layout::create_private_file(&tmp).map_err(wrap)?;
    file.write_all(&bytes).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    fs::rename(&tmp, &path).map_err(wrap)?;
    File::open(partition_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(wrap)?;
    Ok(())
}

/// Reads the checkpoint of `partition_dir`; `Ok(None)` when there is none.
pub fn read(partition_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let path = partition_dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| CheckpointError::Corrupt { path, source })
}

/// What the group has committed for a partition, as far as the assignment could find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Offset(i64),
    /// The group never committed this partition.
    Nothing,
}

/// Where a newly assigned partition starts. `seal_at` is set when the group's commit holds a
/// batch intent: the open batch must then be sealed exactly at that offset, whatever the
/// schedule or size caps say, so the replayed batch is the one recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Continue from the local checkpoint: re-upload its sealed batches, keep filling its open
    /// batch, read from `next_offset`. Sealed batches the group already committed are removed.
    FromCheckpoint {
        checkpoint: Checkpoint,
        seal_at: Option<i64>,
    },
    /// Discard local state and read from the committed offset (or the reset policy).
    FromCommitted {
        reason: String,
        seal_at: Option<i64>,
    },
}

/// Decides where a newly assigned partition starts, in this order of precedence:
///
/// 1. an intent in the group's commit (`intent`: its `[start, end]`, recorded at the committed
///    offset): the batch it
///    names is replayed first, from the local checkpoint when that holds exactly this batch (or
///    its beginning), from Kafka otherwise;
/// 2. the local checkpoint, when it continues exactly where the committed offset stands;
/// 3. the committed offset.
///
/// Anything that does not line up (another consumer moved the partition on, a checkpoint of
/// another partition, a local batch cut differently from the intent) falls back to the commit.
pub fn plan_recovery(
    checkpoint: Option<Checkpoint>,
    topic: &str,
    partition: i32,
    committed: Committed,
    intent: Option<(i64, i64)>,
) -> Recovery {
    let replay = intent.filter(|&(start, _)| committed == Committed::Offset(start));
    let seal_at = replay.map(|(_, end)| end);
    let from_committed = |reason: String| Recovery::FromCommitted { reason, seal_at };
    let Some(mut checkpoint) = checkpoint else {
        return from_committed("no local checkpoint".into());
    };
    if checkpoint.version != FORMAT_VERSION {
        return from_committed(format!("checkpoint format {} unknown", checkpoint.version));
    }
    if checkpoint.topic != topic || checkpoint.partition != partition {
        return from_committed(format!(
            "checkpoint belongs to {}-{}",
            checkpoint.topic, checkpoint.partition
        ));
    }
    let committed = match committed {
        Committed::Nothing => None,
        Committed::Offset(offset) => Some(offset),
    };
    if let Some(committed) = committed {
        // Batches wholly below the committed offset were uploaded and committed already.
        checkpoint.sealed.retain(|batch| batch.end >= committed);
    }
    let Some(first_start) = checkpoint.first_start() else {
        return from_committed("nothing buffered locally".into());
    };
    if let Some(committed) = committed {
        if committed != first_start {
            return from_committed(format!(
                "checkpoint starts at offset {first_start} but the group committed {committed}"
            ));
        }
    }
    let Some((start, end)) = replay else {
        return Recovery::FromCheckpoint {
            checkpoint,
            seal_at: None,
        };
    };
    match checkpoint.sealed.first() {
        Some(batch) if batch.start == start && batch.end == end => Recovery::FromCheckpoint {
            checkpoint,
            seal_at: None,
        },
        Some(batch) => from_committed(format!(
            "local batch [{}, {}] differs from the recorded intent [{start}, {end}]",
            batch.start, batch.end
        )),
        None if checkpoint.next_offset > end + 1 => from_committed(format!(
            "local batch ran past the recorded intent [{start}, {end}]"
        )),
        None => Recovery::FromCheckpoint {
            checkpoint,
            seal_at,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(start: i64, end: i64) -> BatchState {
        BatchState {
            start,
            end,
            files: vec![FileState {
                destination: Destination::Events {
                    source: "s".into(),
                    day: "d".into(),
                },
                first_offset: start,
                records: (end - start + 1) as u64,
                stream: StreamState {
                    compressed_len: 100,
                    crc32: 7,
                    uncompressed_len: 1000,
                },
                accepting: true,
                codec: Codec::Gzip,
            }],
            first_read_ms: None,
            gaps: Vec::new(),
            rules: String::new(),
        }
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            sealed: vec![batch(100, 199), batch(200, 299)],
            open: Some(batch(300, 349)),
            ..Checkpoint::new("events", 2, 350)
        }
    }

    #[test]
    fn encode_decode_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), &checkpoint()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(checkpoint()));
        assert!(!dir.path().join("checkpoint.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_checkpoint_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{\"version\":1,").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[test]
    fn resumes_when_the_checkpoint_starts_at_the_committed_offset() {
        let plan = plan_recovery(
            Some(checkpoint()),
            "events",
            2,
            Committed::Offset(100),
            None,
        );
        assert_eq!(plan, resumed(checkpoint(), None));
    }

    #[test]
    fn committed_batches_are_dropped_before_resuming() {
        let plan = plan_recovery(
            Some(checkpoint()),
            "events",
            2,
            Committed::Offset(200),
            None,
        );
        let Recovery::FromCheckpoint {
            checkpoint: kept, ..
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!(kept.sealed, vec![batch(200, 299)]);
        assert_eq!(kept.next_offset, 350);

        let plan = plan_recovery(
            Some(checkpoint()),
            "events",
            2,
            Committed::Offset(300),
            None,
        );
        assert!(
            matches!(plan, Recovery::FromCheckpoint { checkpoint: c, .. } if c.sealed.is_empty())
        );
    }

    #[test]
    fn never_committed_partitions_trust_the_checkpoint() {
        let plan = plan_recovery(Some(checkpoint()), "events", 2, Committed::Nothing, None);
        assert_eq!(plan, resumed(checkpoint(), None));
    }

    #[test]
    fn anything_that_does_not_line_up_falls_back_to_the_commit() {
        for (checkpoint, topic, partition, committed) in [
            (None, "events", 2, Committed::Offset(100)),
            (Some(checkpoint()), "events", 3, Committed::Offset(100)),
            (Some(checkpoint()), "other", 2, Committed::Offset(100)),
            // Another consumer committed past what we buffered.
            (Some(checkpoint()), "events", 2, Committed::Offset(500)),
            // Committed inside a batch: its cut no longer matches.
            (Some(checkpoint()), "events", 2, Committed::Offset(250)),
            // Committed below what we buffered: a gap we cannot fill locally.
            (Some(checkpoint()), "events", 2, Committed::Offset(50)),
        ] {
            let plan = plan_recovery(checkpoint, topic, partition, committed, None);
            assert!(matches!(plan, Recovery::FromCommitted { .. }), "{plan:?}");
        }
    }

    fn resumed(checkpoint: Checkpoint, seal_at: Option<i64>) -> Recovery {
        Recovery::FromCheckpoint {
            checkpoint,
            seal_at,
        }
    }

    fn intent(start: i64, end: i64) -> (i64, i64) {
        (start, end)
    }

    #[test]
    fn an_intent_takes_precedence_and_reuses_a_matching_local_batch() {
        // The local sealed batch is the one the intent names: upload it again as it is.
        let plan = plan_recovery(
            Some(checkpoint()),
            "events",
            2,
            Committed::Offset(100),
            Some(intent(100, 199)),
        );
        assert_eq!(plan, resumed(checkpoint(), None));

        // Only the beginning of the intent's batch is local: continue it, seal exactly at 349.
        let open_only = Checkpoint {
            sealed: vec![],
            open: Some(batch(300, 320)),
            ..Checkpoint::new("events", 2, 321)
        };
        let plan = plan_recovery(
            Some(open_only.clone()),
            "events",
            2,
            Committed::Offset(300),
            Some(intent(300, 349)),
        );
        assert_eq!(plan, resumed(open_only, Some(349)));
    }

    #[test]
    fn an_intent_that_local_state_contradicts_replays_from_kafka() {
        for (committed, intent) in [
            // Local batch cut at 199, intent says 180.
            (Committed::Offset(100), intent(100, 180)),
            // Local open batch already read past the intent's end.
            (Committed::Offset(300), intent(300, 320)),
        ] {
            let plan = plan_recovery(Some(checkpoint()), "events", 2, committed, Some(intent));
            assert_eq!(
                plan,
                Recovery::FromCommitted {
                    reason: match &plan {
                        Recovery::FromCommitted { reason, .. } => reason.clone(),
                        other => panic!("{other:?}"),
                    },
                    seal_at: Some(intent.1)
                }
            );
        }
        // No checkpoint at all: replay from Kafka, sealing at the intent's end.
        let plan = plan_recovery(
            None,
            "events",
            2,
            Committed::Offset(100),
            Some(intent(100, 150)),
        );
        assert!(matches!(
            plan,
            Recovery::FromCommitted {
                seal_at: Some(150),
                ..
            }
        ));
        // An intent not at the committed offset is history, not a batch in progress.
        let plan = plan_recovery(
            None,
            "events",
            2,
            Committed::Offset(200),
            Some(intent(100, 150)),
        );
        assert!(matches!(
            plan,
            Recovery::FromCommitted { seal_at: None, .. }
        ));
    }
}
