//! The pipeline: every message that crosses a thread or task boundary, in the order a record
//! meets them. This file is the whole contract between the stages (as one event type is the
//! contract of Quickwit's Kafka source): each stage imports it and what lies downstream of it.
//!
//! 1. [`Record`]: the poll loop (`consume`) reads it from Kafka and hands it, inside a
//!    [`WorkerCommand`], to the buffer worker [`worker_for`] its partition;
//! 2. [`WorkerCommand`]: what the poll loop asks of a buffer worker (`buffer`): set up or forget a
//!    partition (with its [`BatchIntent`] to replay), records, seal, checkpoint, committed;
//! 3. [`UploadJob`]: a [`SealedBatch`] of local files, sealed for a [`SealTrigger`], on its way to
//!    the uploader (`upload`);
//! 4. [`CommitRequest`]: the uploader asks the poll thread to commit an intent (before the
//!    objects) or a completion (after them), and hears back a [`CommitResult`] (`commit`).
//!
//! Beside them, [`Fatal`]: any stage raises it when it cannot go on, and every other stage
//! stops.

use std::path::PathBuf;
use std::sync::mpsc::SyncSender;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{BatchState, Committed, FileState, Gap, GapCause, StreamState};
use crate::layout::{Codec, Destination};
use crate::rules::CuttingRules;

/// A condition no stage can get past (a fatal Kafka error, a refused join, a broken local disk):
/// raised once by whichever thread meets it, with the message the operator reads, and a
/// cancellation that async tasks await and blocking loops check.
#[derive(Debug, Default)]
pub struct Fatal {
    message: std::sync::Mutex<Option<String>>,
    raised: tokio_util::sync::CancellationToken,
}

impl Fatal {
    /// Records the first cause (later ones are consequences) and cancels.
    pub fn raise(&self, message: String) {
        let mut slot = self.message.lock().expect("fatal lock");
        if slot.is_none() {
            tracing::error!(error = %message, "stopping");
            *slot = Some(message);
            self.raised.cancel();
        }
    }

    /// The cause, once raised.
    pub fn get(&self) -> Option<String> {
        self.message.lock().expect("fatal lock").clone()
    }

    /// Completes once raised.
    pub async fn raised(&self) {
        self.raised.cancelled().await
    }
}

/// The buffer worker that owns `partition`, of `workers`: always the same one, so a partition's
/// records and commands stay in order.
pub fn worker_for<T>(workers: &[T], partition: i32) -> &T {
    &workers[partition as usize % workers.len()]
}

/// One Kafka record, owned, as the poll loop hands it to the buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    /// Kafka record timestamp in ms, when the broker or producer set one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Keys and values as the producer sent them: a key is any bytes on the wire.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Record {
    /// The bytes the record holds in memory: what [`QueuedRecords`] counts.
    pub fn held_bytes(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum();
        (self.payload.as_ref().map_or(0, Vec::len)
            + self.key.as_ref().map_or(0, Vec::len)
            + headers) as u64
    }
}

/// Bytes of records the poll loop handed to the buffer workers that they have not written yet.
/// The poll loop waits while they are over the budget: what sits in the workers' queues is
/// bounded by bytes, whatever the size of the records (48 commands of 1,000 records of 1 MB
/// each would be gigabytes).
#[derive(Debug)]
pub struct QueuedRecords {
    bytes: std::sync::Mutex<u64>,
    written: std::sync::Condvar,
    budget: u64,
}

impl QueuedRecords {
    pub fn new(budget: u64) -> QueuedRecords {
        QueuedRecords {
            bytes: std::sync::Mutex::new(0),
            written: std::sync::Condvar::new(),
            budget,
        }
    }

    /// Counts `bytes` more as queued, once they fit in the budget (or nothing is queued: a
    /// single round larger than the budget still goes). Answers `false` without counting them
    /// when `give_up` says so while waiting (the member is stopping; a worker that died never
    /// writes what it holds).
    pub fn admit(&self, bytes: u64, give_up: impl Fn() -> bool) -> bool {
        let mut queued = self.bytes.lock().expect("queued lock");
        while *queued > 0 && *queued + bytes > self.budget {
            if give_up() {
                return false;
            }
            queued = self
                .written
                .wait_timeout(queued, std::time::Duration::from_millis(100))
                .expect("queued lock")
                .0;
        }
        *queued += bytes;
        true
    }

    /// A worker wrote (or dropped) records holding `bytes`.
    pub fn written(&self, bytes: u64) {
        let mut queued = self.bytes.lock().expect("queued lock");
        *queued = queued.saturating_sub(bytes);
        self.written.notify_all();
    }

    pub fn get(&self) -> u64 {
        *self.bytes.lock().expect("queued lock")
    }
}

/// Cutting rules fetched from the bucket for a replay, with the suppression list they name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayCut {
    pub rules: CuttingRules,
    pub suppression: Option<std::sync::Arc<crate::suppress::Suppression>>,
}

/// A command from the poll loop to the worker owning a partition.
pub enum WorkerCommand {
    /// Restore or start the partition; replies where to read from (see [`Assigned`]).
    Assign {
        partition: i32,
        epoch: u64,
        committed: Committed,
        /// The batch intent the group's commit holds, if any.
        intent: Option<BatchIntent>,
        /// The log's first offset now, if the broker said: reading from below it means records
        /// were deleted before they were archived.
        log_start: Option<i64>,
        /// The rules the intent's batch was cut with, when they are not this member's own (a
        /// rolling change of settings or release, a suppression list): the replay cuts with them.
        replay_rules: Option<Box<ReplayCut>>,
        /// The files the intent's first upload cut, as the bucket keeps them with the intent
        /// (empty when it keeps none): the replay cuts where they begin.
        planned_files: Vec<PlannedFile>,
        reply: SyncSender<Result<Assigned, BufferError>>,
    },
    /// Forget the partition. `keep_local` keeps its files and checkpoint for a restart on this
    /// volume (shutdown); otherwise they are deleted, as the new owner replays from the commit.
    Revoke {
        partition: i32,
        keep_local: bool,
        reply: SyncSender<()>,
    },
    Records {
        partition: i32,
        records: Vec<Record>,
    },
    /// The schedule fired, or an operator asked: seal every non-empty open batch.
    SealAll {
        trigger: SealTrigger,
    },
    Checkpoint,
    /// The group committed `next_offset` for this partition.
    Committed {
        partition: i32,
        next_offset: i64,
    },
    /// Checkpoint everything and exit.
    Stop {
        reply: SyncSender<()>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("local buffer i/o failed for partition {partition}: {source}")]
    Io {
        partition: i32,
        source: std::io::Error,
    },
    #[error("buffer worker panicked (a bug): see the log above")]
    Panicked,
}

/// Why a batch was sealed; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealTrigger {
    Schedule,
    /// An operator asked for an upload now (SIGUSR1).
    Requested,
    BatchSize,
    DiskPressure,
    Replay,
}

impl SealTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            SealTrigger::Schedule => "schedule",
            SealTrigger::Requested => "requested",
            SealTrigger::BatchSize => "batch-size",
            SealTrigger::DiskPressure => "disk-pressure",
            SealTrigger::Replay => "replay",
        }
    }
}

/// A filesystem block: the least a local file costs, however few bytes it holds.
pub const MIN_FILE_DISK_BYTES: u64 = 4096;

/// What a local file of `compressed_len` bytes counts for in the disk budget: at least a block,
/// so a producer that opens a file per record (a source id or a day each) fills the budget, and
/// pauses reading, long before the volume runs out of blocks and inodes.
pub fn file_disk_charge(compressed_len: u64) -> u64 {
    compressed_len.max(MIN_FILE_DISK_BYTES)
}

/// A batch closed to new records, on its way to S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
    pub files: Vec<SealedFile>,
    /// Unix ms when its first record was read.
    pub first_read_ms: Option<i64>,
    /// Offsets of `[start, end]` that hold no record.
    pub gaps: Vec<Gap>,
    /// Hash of the cutting rules it was cut with, named in its intent.
    pub rules: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFile {
    pub destination: Destination,
    pub first_offset: i64,
    pub records: u64,
    pub path: PathBuf,
    /// The finished object: its length, CRC32 and uncompressed size.
    pub stream: StreamState,
    pub codec: Codec,
    /// The ids its lines name, for the batch's id index (`crate::index`); `None` when not all
    /// are known.
    pub ids: Option<std::sync::Arc<crate::index::IdFilter>>,
}

impl SealedBatch {
    pub fn records(&self) -> u64 {
        self.files.iter().map(|f| f.records).sum()
    }

    pub fn compressed_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.stream.compressed_len).sum()
    }

    /// Where Kafka's log began when the batch was read, if it had deleted the batch's head:
    /// the last offset of a `Deleted` gap among those that run on from its start.
    pub fn deleted_head_through(&self) -> Option<i64> {
        gap_run_from(&self.gaps, self.start).1
    }

    /// What the batch's files count for in the local disk budget (see [`file_disk_charge`]).
    pub fn disk_charge(&self) -> u64 {
        self.files
            .iter()
            .map(|f| file_disk_charge(f.stream.compressed_len))
            .sum()
    }

    pub fn state(&self) -> BatchState {
        BatchState {
            start: self.start,
            end: self.end,
            files: self
                .files
                .iter()
                .map(|f| FileState {
                    destination: f.destination.clone(),
                    first_offset: f.first_offset,
                    records: f.records,
                    stream: f.stream,
                    accepting: false,
                    codec: f.codec,
                })
                .collect(),
            first_read_ms: self.first_read_ms,
            gaps: self.gaps.clone(),
            rules: self.rules.clone(),
        }
    }
}

/// The gaps that run on from `start` without a break, whatever their cause: where that run ends
/// (`start - 1` when there is none), and the last offset of a `Deleted` gap in it. A batch holds
/// no line below the end of the run.
pub fn gap_run_from(gaps: &[Gap], start: i64) -> (i64, Option<i64>) {
    let (mut next, mut deleted) = (start, None);
    for gap in gaps {
        if gap.first > next {
            break;
        }
        if gap.last >= next {
            next = gap.last + 1;
            if gap.cause == GapCause::Deleted {
                deleted = Some(gap.last);
            }
        }
    }
    (next - 1, deleted)
}

/// A sealed batch to upload, tagged with the assignment it was read under.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub epoch: u64,
    pub batch: SealedBatch,
    /// Its objects may already be in the bucket (a replayed intent, a sealed batch resumed from
    /// the local checkpoint): each is looked up before it is put.
    pub may_exist: bool,
    /// The files the batch's first attempt cut, when this upload continues a recorded intent
    /// whose plan the bucket keeps: the intent it records again names that same plan, and its
    /// files adopt what the attempt put. Empty: the batch's own files are its plan.
    pub plan: Vec<PlannedFile>,
}

/// The intent recorded before a batch's upload, as committed-offset metadata of its first
/// offset: "batch `[start, end]` is being uploaded, cut with these rules". A member assigned a
/// partition whose commit carries one replays exactly that range first, producing the same files
/// under the same keys, so an upload interrupted anywhere is finished, never duplicated.
///
/// Recording it is a commit, fenced by the group generation: a member that lost the partition
/// without knowing it (a zombie) cannot record one, so it cannot start a batch of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchIntent {
    pub v: u32,
    pub start: i64,
    pub end: i64,
    /// Version 2: the hash of the cutting rules the batch was cut with (`rules`), stored in the
    /// bucket. Version 1 (earlier releases): a CRC32 fingerprint of the routing settings and
    /// key prefix.
    pub rules: String,
    /// Version 1 only: the file size cap the batch was cut with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    /// The hash of the files the batch's first attempt cut ([`plan_hash`]), kept in the bucket
    /// (`layout::plan_key`) before the intent is committed: whoever replays it cuts where those
    /// files begin, even when the member that recorded it never got further (a crash right
    /// after the commit, a zombie that thaws later and puts its objects). `None`: an earlier
    /// release, which kept the files beside the intent only after the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Set by a replay Kafka deleted the head of: its files hold only the records from this
    /// offset on, the last lines of the planned files, and it may put them. A later member
    /// holding a local copy of the batch with more lines must not upload it beside them (no
    /// object of it could be adopted, nor its lines accounted for): it reads from Kafka again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_from: Option<i64>,
}

impl BatchIntent {
    const VERSION: u32 = 2;

    pub fn new(start: i64, end: i64, rules_hash: String) -> BatchIntent {
        BatchIntent {
            v: Self::VERSION,
            start,
            end,
            rules: rules_hash,
            max_file_bytes: None,
            plan: None,
            kept_from: None,
        }
    }

    /// The intent naming the plan its batch's files were cut by.
    pub fn with_plan(self, hash: String) -> BatchIntent {
        BatchIntent {
            plan: Some(hash),
            ..self
        }
    }

    /// Whether an earlier release recorded it (rules as a fingerprint, not a hash).
    pub fn is_legacy(&self) -> bool {
        self.v == 1
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("intent serializes")
    }

    /// The intent in a commit's metadata; `None` for empty or foreign metadata.
    pub fn decode(metadata: &str) -> Option<BatchIntent> {
        serde_json::from_str::<BatchIntent>(metadata)
            .ok()
            .filter(|intent| {
                let known = match intent.v {
                    1 => intent.max_file_bytes.is_some(),
                    v => v == Self::VERSION,
                };
                known && intent.start <= intent.end
            })
    }
}

/// One file of a batch as its first upload cut it. The bucket keeps the list beside the intent
/// ([`KeptIntent`]): records Kafka deletes later (retention reaching an interrupted batch) would
/// otherwise shift the cuts of its replay, so the replay cuts where these files begin and
/// adopts the ones an earlier attempt already put.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    pub destination: Destination,
    pub first_offset: i64,
    pub records: u64,
    /// CRC32 of its uncompressed lines: with `records`, what the object holds when the attempt
    /// that put it read every record of the file.
    pub crc32: u32,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub codec: Codec,
}

/// The intent as the bucket keeps it (`layout::plan_key` before its commit, `layout::intent_key`
/// after): the committed one, with the files its batch was cut into, which do not fit in commit
/// metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptIntent {
    #[serde(flatten)]
    pub intent: BatchIntent,
    #[serde(default)]
    pub files: Vec<PlannedFile>,
}

/// The name of a plan: an MD5 of its files, as an intent records it. Content-addressed, so a
/// plan put twice (a replay, a zombie) is the same object, and one an intent names is the one
/// its batch was cut by.
pub fn plan_hash(files: &[PlannedFile]) -> String {
    use md5::Digest as _;
    let digest = md5::Md5::digest(serde_json::to_vec(files).expect("plan serializes"));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl PlannedFile {
    /// A sealed file, as its batch's intent keeps it.
    pub fn of(file: &SealedFile) -> PlannedFile {
        PlannedFile {
            destination: file.destination.clone(),
            first_offset: file.first_offset,
            records: file.records,
            crc32: file.stream.crc32,
            uncompressed_bytes: file.stream.uncompressed_len,
            compressed_bytes: file.stream.compressed_len,
            codec: file.codec,
        }
    }
}

impl KeptIntent {
    /// The intent of `batch`, naming the plan it is cut by: `first_attempt`'s files (a replay
    /// keeps them: Kafka may hold fewer records by now), or its own when that is empty.
    pub fn of_batch(batch: &SealedBatch, first_attempt: &[PlannedFile]) -> KeptIntent {
        let files = if first_attempt.is_empty() {
            batch.files.iter().map(PlannedFile::of).collect()
        } else {
            first_attempt.to_vec()
        };
        // A replay Kafka deleted the head of (a gap further on is no head: a first attempt
        // overtaken mid-read keeps lines on both sides, and continuing it is no replay's).
        let kept_from = (!first_attempt.is_empty())
            .then(|| batch.deleted_head_through())
            .flatten()
            .map(|last| last + 1);
        KeptIntent {
            intent: BatchIntent {
                kept_from,
                ..BatchIntent::new(batch.start, batch.end, batch.rules.clone())
                    .with_plan(plan_hash(&files))
            },
            files,
        }
    }

    /// Whether these are the files `intent` names (its plan's hash matches), or, for an
    /// intent an earlier release recorded without one, whether it is the same intent.
    pub fn is_plan_of(&self, intent: &BatchIntent) -> bool {
        let same_range = (self.intent.start, self.intent.end, &self.intent.rules)
            == (intent.start, intent.end, &intent.rules);
        match &intent.plan {
            Some(hash) => same_range && plan_hash(&self.files) == *hash,
            None => self.intent == *intent,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("kept intent serializes")
    }

    /// The kept intent in an object's bytes; `None` for anything else. Objects an earlier
    /// release kept hold the intent alone, without files.
    pub fn decode(bytes: &[u8]) -> Option<KeptIntent> {
        let kept: KeptIntent = serde_json::from_slice(bytes).ok()?;
        let intent = BatchIntent::decode(&serde_json::to_string(&kept.intent).ok()?)?;
        Some(KeptIntent { intent, ..kept })
    }
}

/// A buffer worker's answer to an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    /// The offset to read from; `None` lets the consumer use the committed one.
    pub read_from: Option<i64>,
    /// For a partition the group never committed: the first offset this member's archive of
    /// it holds or reads. The poll thread commits it before any record is read, so a member
    /// that takes the partition over on another volume starts there too, and reports what
    /// retention deleted since instead of starting at the log's new start without a word.
    pub first_contact: Option<i64>,
}

/// A commit the uploader asks the poll thread for: an intent (`metadata` set, at the batch's
/// start) before uploading, or the completion (`end + 1`, no metadata) after.
#[derive(Debug)]
pub struct CommitRequest {
    pub partition: i32,
    pub epoch: u64,
    pub next_offset: i64,
    pub metadata: String,
    /// Told the outcome; the uploader waits for it before uploading an intent's batch.
    pub reply: Option<tokio::sync::oneshot::Sender<CommitResult>>,
}

/// What became of a commit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitResult {
    Committed,
    /// The partition is no longer ours under that epoch: the new owner replays the batch.
    NotOwner,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(first: i64, last: i64, cause: GapCause) -> Gap {
        Gap { first, last, cause }
    }

    #[test]
    fn the_gaps_that_run_on_from_a_batch_start_are_its_head() {
        assert_eq!(gap_run_from(&[], 100), (99, None));
        let head = [
            gap(100, 104, GapCause::NoRecord),
            gap(105, 149, GapCause::Deleted),
            gap(150, 150, GapCause::Suppressed),
            gap(170, 180, GapCause::Deleted),
        ];
        assert_eq!(gap_run_from(&head, 100), (150, Some(149)));
        // A first attempt overtaken mid-read: lines on both sides of its deleted gap.
        let middle = [gap(120, 149, GapCause::Deleted)];
        assert_eq!(gap_run_from(&middle, 100), (99, None));
    }

    #[test]
    fn queued_records_wait_for_the_workers_once_over_budget() {
        let queued = std::sync::Arc::new(QueuedRecords::new(100));
        // One round larger than the budget still goes when nothing is queued.
        assert!(queued.admit(150, || false));
        assert_eq!(queued.get(), 150);
        // The next waits until a worker wrote enough, however long that takes.
        let admitted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (queued, admitted) = (queued.clone(), admitted.clone());
            std::thread::spawn(move || {
                assert!(queued.admit(60, || false));
                admitted.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!admitted.load(std::sync::atomic::Ordering::SeqCst));
        queued.written(150);
        waiter.join().unwrap();
        assert_eq!(queued.get(), 60);
        // A member that stops gives up waiting, counting nothing.
        assert!(queued.admit(40, || true), "fits: no wait");
        assert!(!queued.admit(1, || true));
        assert_eq!(queued.get(), 100);
    }

    #[test]
    fn intents_round_trip_and_foreign_metadata_is_ignored() {
        let intent = BatchIntent::new(100, 199, "abc".into());
        assert_eq!(BatchIntent::decode(&intent.encode()), Some(intent));
        // What earlier releases recorded is still understood.
        let legacy = BatchIntent::decode(
            r#"{"v":1,"start":1,"end":2,"max_file_bytes":1048576,"rules":"0a1b2c3d"}"#,
        )
        .unwrap();
        assert!(legacy.is_legacy());
        assert_eq!(legacy.max_file_bytes, Some(1 << 20));
        for foreign in [
            "",
            "hello",
            "{}",
            r#"{"v":3,"start":1,"end":2,"rules":""}"#,
            r#"{"v":1,"start":1,"end":2,"rules":""}"#,
        ] {
            assert_eq!(BatchIntent::decode(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn a_kept_intent_carries_its_files_and_reads_as_the_intent_alone() {
        let kept = KeptIntent {
            intent: BatchIntent::new(10, 20, "abc".into()),
            files: vec![PlannedFile {
                destination: Destination::Events {
                    source: "web".into(),
                    day: "2026-12-01".into(),
                },
                first_offset: 12,
                records: 3,
                crc32: 0xdead_beef,
                uncompressed_bytes: 300,
                compressed_bytes: 100,
                codec: Codec::Gzip,
            }],
        };
        let bytes = kept.encode();
        assert_eq!(KeptIntent::decode(&bytes), Some(kept.clone()));
        // What a member reading only the intent (or an earlier release) sees.
        let alone = BatchIntent::decode(std::str::from_utf8(&bytes).unwrap());
        assert_eq!(alone, Some(kept.intent.clone()));
        // An earlier release kept the intent without files.
        let earlier = KeptIntent::decode(kept.intent.encode().as_bytes()).unwrap();
        assert!(earlier.files.is_empty());
        assert_eq!(KeptIntent::decode(b"{}"), None);
    }

    #[test]
    fn an_intent_names_its_plan_and_only_that_plan_is_taken_for_it() {
        let file = |records| PlannedFile {
            destination: Destination::Events {
                source: "web".into(),
                day: "2026-12-01".into(),
            },
            first_offset: 10,
            records,
            crc32: 7,
            uncompressed_bytes: 30,
            compressed_bytes: 20,
            codec: Codec::Gzip,
        };
        let first = vec![file(3)];
        let hash = plan_hash(&first);
        assert_eq!(hash.len(), 32);
        assert_ne!(hash, plan_hash(&[file(2)]), "other cuts, another plan");
        let intent = BatchIntent::new(10, 20, "abc".into()).with_plan(hash.clone());
        // Commit metadata carries the name; an earlier release reading it ignores the field.
        assert_eq!(BatchIntent::decode(&intent.encode()), Some(intent.clone()));
        let plan = KeptIntent {
            intent: intent.clone(),
            files: first.clone(),
        };
        assert!(plan.is_plan_of(&intent));
        // A zombie's later attempt of the same range kept other files: not this intent's plan.
        let other = KeptIntent {
            intent: intent.clone(),
            files: vec![file(2)],
        };
        assert!(!other.is_plan_of(&intent));
        let elsewhere = BatchIntent::new(10, 21, "abc".into()).with_plan(hash);
        assert!(!plan.is_plan_of(&elsewhere));
        // An intent an earlier release recorded names no plan: the same intent's files serve.
        let legacy = BatchIntent::new(10, 20, "abc".into());
        let kept = KeptIntent {
            intent: legacy.clone(),
            files: first,
        };
        assert!(kept.is_plan_of(&legacy));
        assert!(!plan.is_plan_of(&legacy));
    }
}
