//! One partition's buffers: the open batch, where each record is routed to the compressed file of
//! its `(source, day)` (cut at a size cap), and the sealed batches waiting for their commit.
//!
//! Everything here is a pure function of the records in offset order plus the cutting rules, so
//! replaying the same offsets produces the same files, holding the same records, under the same
//! keys.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::buffer::gzfile::{GzStreamFile, MAX_STAGE_BYTES};
use crate::buffer::zstd_object;
use crate::checkpoint::{self, BatchState, Checkpoint, FileState, Gap, GapCause};
use crate::index::IdFilter;
use crate::layout;
use crate::layout::{Codec, Destination};
use crate::pipeline::{file_disk_charge, PlannedFile, Record, SealedBatch, SealedFile};
use crate::route::{DeadLetterReason, Router};

/// Cutting rules and compression settings, the same for every partition.
#[derive(Debug, Clone, Copy)]
pub struct BufferSettings {
    pub compression_level: u32,
    pub max_file_bytes: u64,
    pub max_batch_bytes: u64,
    /// A batch is sealed early once it holds this many files.
    pub max_batch_files: usize,
    /// How sealed files become objects (`output.compression`); part of the cutting rules.
    pub codec: Codec,
    pub zstd_level: i32,
    /// Keep an id filter per file for the batch's id index (`output.id_index`).
    pub id_index: bool,
}

/// What a batch's id filters may hold in memory, and one file's: past either, a growing filter
/// is dropped (its object is read whole by `forget`), so a producer flooding distinct ids costs
/// a bounded amount of memory per partition.
const INDEX_BATCH_BYTES: usize = if cfg!(test) { 32 << 10 } else { 16 << 20 };
const INDEX_FILE_BYTES: usize = if cfg!(test) { 8 << 10 } else { 5 << 19 };

/// Emptied files a partition keeps for its next batches (`Spares`): more than a batch of the
/// default 100 sources x 2 days opens, and empty files hold no disk blocks.
const MAX_SPARE_FILES: usize = if cfg!(test) { 4 } else { 1024 };

/// Files of committed batches, emptied and kept under [`layout::spare_dir`] to be renamed into
/// the next batch. Creating a file allocates an inode, and on ext4 without a journal that means
/// checking recently deleted ones first: about half a millisecond a file once a member has
/// deleted thousands, the largest share of an object's cost. A rename and a truncate allocate
/// nothing.
///
/// Safe because a file is only emptied once its batch is committed, which the uploader asks
/// for after every object of the batch is up: no upload of this assignment reads it any more,
/// and one of an earlier assignment read a file the revocation deleted, never a spare.
struct Spares {
    dir: PathBuf,
    /// Emptied files, ready to be renamed.
    files: Vec<PathBuf>,
    /// Names the next spare: names are never reused within the process.
    next_name: u64,
}

impl Spares {
    fn new(partition_dir: &Path) -> Spares {
        Spares {
            dir: layout::spare_dir(partition_dir),
            files: Vec::new(),
            next_name: 0,
        }
    }

    /// Empties `path` and keeps it, or leaves it where it is (for the batch directory's
    /// removal) when enough are kept or it cannot be moved.
    fn keep(&mut self, path: &Path) {
        if self.files.len() >= MAX_SPARE_FILES {
            return;
        }
        if self.files.is_empty() {
            if let Err(err) = fs::create_dir(&self.dir) {
                if err.kind() != io::ErrorKind::AlreadyExists {
                    return;
                }
            }
        }
        let spare = self.dir.join(self.next_name.to_string());
        let emptied = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|file| file.set_len(0));
        if emptied.is_ok() && fs::rename(path, &spare).is_ok() {
            self.next_name += 1;
            self.files.push(spare);
        }
    }

    /// Moves a kept file to `path`, where the caller creates (truncates) it; false if none was
    /// kept or the move failed, and the caller creates a new one.
    fn take_to(&mut self, path: &Path) -> bool {
        while let Some(spare) = self.files.pop() {
            if fs::rename(&spare, path).is_ok() {
                return true;
            }
        }
        false
    }
}

struct OpenFile {
    destination: Destination,
    first_offset: i64,
    records: u64,
    gz: GzStreamFile,
    accepting: bool,
    /// Tick of the last append, to find the coldest file when compressors must be freed.
    last_used: u64,
    /// The routing keys of the ids its lines name (`crate::index`); `None` when not all are
    /// known (a file reopened from a checkpoint, a line whose ids could not all be read) or no
    /// index is kept.
    ids: Option<IdFilter>,
}

/// The batch taking records.
struct OpenBatch {
    /// The position the batch began at; `None` until known (first record of a partition the
    /// group never committed).
    start: Option<i64>,
    last_offset: Option<i64>,
    files: Vec<OpenFile>,
    /// Destination → index of its file still taking records.
    accepting: HashMap<Destination, usize>,
    uncompressed_bytes: u64,
    /// Bytes its files' id filters hold, against [`INDEX_BATCH_BYTES`].
    index_bytes: usize,
    /// Unix ms when its first record was read.
    first_read_ms: Option<i64>,
    /// Offsets between `start` and the last record that hold no record.
    gaps: Vec<Gap>,
}

impl OpenBatch {
    fn empty(start: Option<i64>) -> OpenBatch {
        OpenBatch {
            start,
            last_offset: None,
            files: Vec::new(),
            accepting: HashMap::new(),
            uncompressed_bytes: 0,
            index_bytes: 0,
            first_read_ms: None,
            gaps: Vec::new(),
        }
    }
}

/// Where a replayed batch's files begin, as its first upload cut them (the bucket keeps them
/// with the intent). A replay whose head Kafka deleted meanwhile would start each destination's
/// first file later and so cut the rest elsewhere: with the plan, every record goes to the file
/// its first upload put it in, and no size cap cuts.
struct CutPlan {
    /// Destination → the first offsets of its files, ascending.
    firsts: HashMap<Destination, Vec<i64>>,
    /// `(destination, first offset)` → index of the open file.
    open: HashMap<(Destination, i64), usize>,
    /// The plan as the bucket keeps it: the replay's intent names it again.
    files: Vec<PlannedFile>,
}

impl CutPlan {
    /// The first offset of the planned file that a record at `offset` belongs to.
    fn first_for(&self, destination: &Destination, offset: i64) -> Option<i64> {
        let firsts = self.firsts.get(destination)?;
        let after = firsts.partition_point(|&first| first <= offset);
        after.checked_sub(1).map(|i| firsts[i])
    }
}

/// What one append did, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub bytes: u64,
    pub dead_letter: Option<DeadLetterReason>,
    /// A compressor was started (a cold file's first chunk).
    pub heated: bool,
    /// A suppressed user's record: not archived, its offset recorded as a gap.
    pub suppressed: bool,
}

pub struct PartitionBuffer {
    topic: String,
    partition: i32,
    dir: PathBuf,
    router: Router,
    settings: BufferSettings,
    open: OpenBatch,
    sealed: Vec<SealedBatch>,
    /// The next offset expected from Kafka; records below it are stale re-deliveries.
    next_offset: Option<i64>,
    /// Replaying a recorded intent: the open batch ends exactly here, and only here.
    seal_at: Option<i64>,
    /// During a replay: Kafka delivered an offset past `seal_at`, so every record up to it was
    /// read even if the batch's last offsets hold none (compaction, transaction markers).
    replay_passed_end: bool,
    /// Bytes a file stages before compressing; the worker lowers it when it holds many files.
    stage_limit: usize,
    /// The log's first offset when the partition was assigned: offsets below it were deleted
    /// (retention, DeleteRecords) before they could be read, and their gap says so.
    log_start: Option<i64>,
    /// Hash of the cutting rules the open batch is cut with (`rules`).
    rules: String,
    /// While a replay cuts with the rules its intent names: this member's own router,
    /// settings and rules, restored once the replayed batch is sealed.
    after_replay: Option<(Router, BufferSettings, String)>,
    /// While a replay cuts where its first upload did (`cut_as_planned`).
    plan: Option<CutPlan>,
    /// Files of committed batches, for the next files to open.
    spares: Spares,
}

impl PartitionBuffer {
    /// A partition with nothing buffered, reading from `start` (or its first record).
    pub fn fresh(
        data_dir: &Path,
        topic: &str,
        partition: i32,
        router: Router,
        settings: BufferSettings,
        start: Option<i64>,
    ) -> io::Result<PartitionBuffer> {
        let dir = layout::partition_dir(data_dir, topic, partition);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        let spares = Spares::new(&dir);
        Ok(PartitionBuffer {
            topic: topic.to_string(),
            partition,
            dir,
            router: router.with_index(settings.id_index),
            settings,
            open: OpenBatch::empty(start),
            sealed: Vec::new(),
            next_offset: start,
            seal_at: None,
            replay_passed_end: false,
            stage_limit: MAX_STAGE_BYTES,
            log_start: None,
            rules: String::new(),
            after_replay: None,
            plan: None,
            spares,
        })
    }

    /// Rebuilds a partition from its checkpoint: sealed batches as they were, the open batch's
    /// files truncated to their last flush. Fails if a file is missing or short; the caller then
    /// falls back to the committed offset.
    pub fn resume(
        data_dir: &Path,
        router: Router,
        settings: BufferSettings,
        checkpoint: Checkpoint,
    ) -> io::Result<PartitionBuffer> {
        let dir = layout::partition_dir(data_dir, &checkpoint.topic, checkpoint.partition);
        let file_path = |batch_start: i64, first_offset: i64| {
            layout::batch_dir(&dir, batch_start).join(layout::object_name(
                &checkpoint.topic,
                checkpoint.partition,
                first_offset,
                Codec::Gzip,
            ))
        };
        let mut sealed = Vec::new();
        for batch in &checkpoint.sealed {
            let mut files = Vec::new();
            for file in &batch.files {
                let path = file_path(batch.start, file.first_offset)
                    .with_extension(&file.codec.extension()[1..]);
                let len = fs::metadata(&path)?.len();
                if len != file.stream.compressed_len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} holds {len} bytes, checkpoint recorded {}",
                            path.display(),
                            file.stream.compressed_len
                        ),
                    ));
                }
                files.push(SealedFile {
                    destination: file.destination.clone(),
                    first_offset: file.first_offset,
                    records: file.records,
                    path,
                    stream: file.stream,
                    codec: file.codec,
                    // Sealed by a process that is gone: its objects are read whole by `forget`.
                    ids: None,
                });
            }
            sealed.push(SealedBatch {
                topic: checkpoint.topic.clone(),
                partition: checkpoint.partition,
                start: batch.start,
                end: batch.end,
                files,
                first_read_ms: batch.first_read_ms,
                gaps: batch.gaps.clone(),
                rules: batch.rules.clone(),
            });
        }
        let mut open = OpenBatch::empty(Some(checkpoint.next_offset));
        if let Some(batch) = &checkpoint.open {
            open.start = Some(batch.start);
            open.last_offset = Some(batch.end);
            open.first_read_ms = batch.first_read_ms;
            open.gaps = batch.gaps.clone();
            for file in &batch.files {
                let path = file_path(batch.start, file.first_offset);
                let gz = GzStreamFile::resume(&path, settings.compression_level, file.stream)?;
                if file.accepting {
                    open.accepting
                        .insert(file.destination.clone(), open.files.len());
                }
                open.uncompressed_bytes += file.stream.uncompressed_len;
                open.files.push(OpenFile {
                    destination: file.destination.clone(),
                    first_offset: file.first_offset,
                    records: file.records,
                    gz,
                    accepting: file.accepting,
                    last_used: 0,
                    // The lines before the crash were routed by a process that is gone.
                    ids: None,
                });
            }
        }
        // Batch directories the checkpoint does not name are leftovers of a crash mid-seal or
        // mid-cleanup.
        let known: Vec<PathBuf> = checkpoint
            .sealed
            .iter()
            .chain(checkpoint.open.iter())
            .map(|b| layout::batch_dir(&dir, b.start))
            .collect();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() && !known.contains(&path) {
                fs::remove_dir_all(&path)?;
            }
        }
        let spares = Spares::new(&dir);
        Ok(PartitionBuffer {
            topic: checkpoint.topic,
            partition: checkpoint.partition,
            dir,
            router: router.with_index(settings.id_index),
            settings,
            open,
            sealed,
            next_offset: Some(checkpoint.next_offset),
            seal_at: None,
            replay_passed_end: false,
            stage_limit: MAX_STAGE_BYTES,
            log_start: None,
            rules: checkpoint.open.map(|b| b.rules).unwrap_or_default(),
            after_replay: None,
            plan: None,
            spares,
        })
    }

    /// Labels the open batch, and batches a checkpoint of an earlier release left unlabelled,
    /// with the hash of the rules this member cuts with.
    pub fn set_rules(&mut self, hash: &str) {
        self.rules = hash.to_string();
        for batch in &mut self.sealed {
            if batch.rules.is_empty() {
                batch.rules = hash.to_string();
            }
        }
    }

    /// The hash of the rules the open batch is cut with.
    pub fn rules(&self) -> &str {
        &self.rules
    }

    /// Whether the open batch holds nothing yet and is no replay: other rules may begin here.
    pub fn at_batch_boundary(&self) -> bool {
        self.seal_at.is_none()
            && self.after_replay.is_none()
            && self.open.last_offset.is_none()
            && self.open.files.is_empty()
            && self.open.gaps.is_empty()
    }

    /// Cuts from the next batch on (this one: it holds nothing yet, `at_batch_boundary`) with
    /// `router`, under the rules `hash` (a new suppression list).
    pub fn take_up(&mut self, router: Router, hash: &str) {
        debug_assert!(self.at_batch_boundary());
        self.router = router.with_index(self.settings.id_index);
        self.rules = hash.to_string();
    }

    /// Cuts the open batch (a replay) with the rules its intent names; the batches after it go
    /// back to the current ones.
    pub fn replay_with(&mut self, router: Router, settings: BufferSettings, hash: String) {
        let own = (
            std::mem::replace(&mut self.router, router.with_index(settings.id_index)),
            std::mem::replace(&mut self.settings, settings),
            std::mem::replace(&mut self.rules, hash),
        );
        self.after_replay = Some(own);
    }

    /// Cuts the open batch (a replay) into the files its first upload cut, whatever records
    /// Kafka still holds; the batches after it are cut by size again. An empty plan (the
    /// bucket kept none: an earlier release) leaves the size cuts.
    pub fn cut_as_planned(&mut self, files: &[PlannedFile]) {
        if files.is_empty() {
            return;
        }
        let mut firsts: HashMap<Destination, Vec<i64>> = HashMap::new();
        for file in files {
            firsts
                .entry(file.destination.clone())
                .or_default()
                .push(file.first_offset);
        }
        for list in firsts.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        let open = self
            .open
            .files
            .iter()
            .enumerate()
            .map(|(index, file)| ((file.destination.clone(), file.first_offset), index))
            .collect();
        self.plan = Some(CutPlan {
            firsts,
            open,
            files: files.to_vec(),
        });
    }

    /// The files the open batch (a replay) is cut into, as its first upload cut them; empty
    /// when it is cut by size.
    pub fn planned_files(&self) -> &[PlannedFile] {
        self.plan.as_ref().map_or(&[], |plan| &plan.files)
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Sealed batches not yet committed, oldest first (after a resume: to upload again).
    pub fn sealed(&self) -> &[SealedBatch] {
        &self.sealed
    }

    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// The lowest offset this buffer holds or reads next: where the archive of the partition
    /// starts as far as this member knows; `None` before its first record when nothing told
    /// it where the log starts.
    pub fn first_offset(&self) -> Option<i64> {
        self.sealed
            .first()
            .map(|batch| batch.start)
            .or(self.open.start)
            .or(self.next_offset)
    }

    /// Uncompressed bytes of the open batch.
    pub fn open_bytes(&self) -> u64 {
        self.open.uncompressed_bytes
    }

    /// Compressed bytes on local disk, open and sealed.
    /// What this partition's local files count for in the disk budget.
    pub fn disk_bytes(&self) -> u64 {
        let open: u64 = self
            .open
            .files
            .iter()
            .map(|f| file_disk_charge(f.gz.compressed_len()))
            .sum();
        let sealed: u64 = self.sealed.iter().map(SealedBatch::disk_charge).sum();
        open + sealed
    }

    /// Unix ms when the oldest record not yet committed was read, if any is buffered.
    pub fn oldest_pending_ms(&self) -> Option<i64> {
        self.sealed
            .iter()
            .filter_map(|b| b.first_read_ms)
            .chain(self.open.first_read_ms)
            .min()
    }

    pub fn open_files(&self) -> usize {
        self.open.files.len()
    }

    pub fn hot_files(&self) -> usize {
        self.open.files.iter().filter(|f| f.gz.is_hot()).count()
    }

    /// Where the log starts, as last read (at assignment, or when a gap was seen).
    pub fn set_log_start(&mut self, log_start: Option<i64>) {
        self.log_start = log_start;
    }

    pub fn log_start(&self) -> Option<i64> {
        self.log_start
    }

    /// The offsets `[first, last]` a record at `offset` would leave out of the open batch, if
    /// it skips any (a redelivered record skips none: it is not appended).
    pub fn gap_before(&self, offset: i64) -> Option<(i64, i64)> {
        if self.next_offset.is_some_and(|next| offset < next) {
            return None;
        }
        let start = self.open.start.unwrap_or(offset);
        let expected = self.open.last_offset.map_or(start, |last| last + 1);
        (offset > expected).then(|| (expected, offset - 1))
    }

    /// Records that `[first, last]` holds no record: the part below the log start was deleted
    /// before it was read, the rest held none (compaction, transaction markers). The worker reads
    /// the log start again before a gap the known one does not cover (`gap_before`).
    fn record_gap(&mut self, first: i64, last: i64) -> io::Result<()> {
        let split = self
            .log_start
            .map_or(first, |start| start.clamp(first, last + 1));
        if split > first && self.seal_at.is_some() && !self.open.files.is_empty() {
            self.drop_what_the_replay_read(split - 1)?;
        } else if split > first {
            self.open.gaps.push(Gap {
                first,
                last: split - 1,
                cause: GapCause::Deleted,
            });
        }
        if split <= last {
            self.open.gaps.push(Gap {
                first: split,
                last,
                cause: GapCause::NoRecord,
            });
        }
        Ok(())
    }

    /// Retention overtook a replay mid-read: Kafka deleted offsets up to `deleted_through`,
    /// so every record the replay read before them is gone from Kafka too (a log is deleted
    /// from its head). Its files would hold the first lines of the planned ones, which no later
    /// attempt can read again and whose objects no later attempt could adopt; so the replay
    /// drops them and records the whole head of the batch as deleted: like every replay Kafka
    /// deleted the head of, its files hold the last lines of the planned ones (`upload::adopt`).
    /// The checkpoint is rewritten at once: the next records may reopen files at these paths.
    fn drop_what_the_replay_read(&mut self, deleted_through: i64) -> io::Result<()> {
        let start = self.open.start.expect("a batch holding files has begun");
        let dropped: u64 = self.open.files.iter().map(|file| file.records).sum();
        for file in std::mem::take(&mut self.open.files) {
            let path = file.gz.path().to_path_buf();
            drop(file);
            match fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        self.open.accepting.clear();
        if let Some(plan) = &mut self.plan {
            plan.open.clear();
        }
        self.open.uncompressed_bytes = 0;
        self.open.gaps = vec![Gap {
            first: start,
            last: deleted_through,
            cause: GapCause::Deleted,
        }];
        self.open.last_offset = Some(deleted_through);
        self.next_offset = Some(
            self.next_offset
                .map_or(deleted_through + 1, |next| next.max(deleted_through + 1)),
        );
        tracing::warn!(
            partition = self.partition,
            batch_start = start,
            deleted_through,
            dropped,
            "retention overtook the replay of a batch: dropping the records it read before the deleted ones, which Kafka no longer holds either"
        );
        self.write_checkpoint()
    }

    /// Sets how many uncompressed bytes each file stages before compressing them as one chunk.
    pub fn set_stage_limit(&mut self, bytes: usize) {
        self.stage_limit = bytes;
    }

    /// Sets the stage limit and brings every open file's staging within it: the worker's share
    /// of the staging budget is spread over the files of all its partitions, so files that
    /// staged lines under a higher limit must give them up when others open.
    pub fn fit_staging(&mut self, bytes: usize) -> io::Result<()> {
        self.stage_limit = bytes;
        self.open
            .files
            .iter_mut()
            .try_for_each(|file| file.gz.fit_staging(bytes))
    }

    /// Bytes the open files' staging buffers hold.
    #[cfg(test)]
    pub fn staging_bytes(&self) -> usize {
        self.open.files.iter().map(|f| f.gz.staged_capacity()).sum()
    }

    /// Routes and appends one record. Records below the expected offset were already buffered
    /// (librdkafka can redeliver after a seek) and are skipped: `Ok(None)`.
    pub fn append(&mut self, record: &Record, tick: u64) -> io::Result<Option<Appended>> {
        if self.next_offset.is_some_and(|next| record.offset < next) {
            return Ok(None);
        }
        let routed = self.router.route(record);
        let start = *self.open.start.get_or_insert(record.offset);
        let expected = self.open.last_offset.map_or(start, |last| last + 1);
        if record.offset > expected {
            self.record_gap(expected, record.offset - 1)?;
        }
        self.open
            .first_read_ms
            .get_or_insert_with(|| chrono::Utc::now().timestamp_millis());
        if routed.suppressed {
            match self.open.gaps.last_mut() {
                Some(gap) if gap.cause == GapCause::Suppressed && gap.last + 1 == record.offset => {
                    gap.last = record.offset;
                }
                _ => self.open.gaps.push(Gap {
                    first: record.offset,
                    last: record.offset,
                    cause: GapCause::Suppressed,
                }),
            }
            self.open.last_offset = Some(record.offset);
            self.next_offset = Some(record.offset + 1);
            return Ok(Some(Appended {
                bytes: 0,
                dead_letter: None,
                heated: false,
                suppressed: true,
            }));
        }
        let planned = self
            .plan
            .as_ref()
            .and_then(|plan| plan.first_for(&routed.destination, record.offset));
        let index = match planned {
            Some(first) => {
                let key = (routed.destination.clone(), first);
                match self.plan.as_ref().and_then(|plan| plan.open.get(&key)) {
                    Some(&index) => index,
                    None => {
                        // Named by where the first upload began it, even when Kafka no longer
                        // holds that record: the same key as the object it may have put.
                        let index = self.open_file(&routed.destination, first, start, tick)?;
                        if let Some(plan) = &mut self.plan {
                            plan.open.insert(key, index);
                        }
                        index
                    }
                }
            }
            None => match self.open.accepting.get(&routed.destination) {
                Some(&index) => index,
                None => {
                    let index = self.open_file(&routed.destination, record.offset, start, tick)?;
                    self.open
                        .accepting
                        .insert(routed.destination.clone(), index);
                    index
                }
            },
        };
        let file = &mut self.open.files[index];
        let before = file.gz.uncompressed_len();
        let heated = file.gz.append_line(&routed.line, self.stage_limit)?;
        file.records += 1;
        if let Some(filter) = &mut file.ids {
            let before = filter.heap_bytes();
            for &key in routed.ids.keys() {
                filter.insert(key);
            }
            let after = filter.heap_bytes();
            self.open.index_bytes += after - before;
            let too_big = after > INDEX_FILE_BYTES || self.open.index_bytes > INDEX_BATCH_BYTES;
            if !routed.ids.is_complete() || too_big {
                self.open.index_bytes -= after;
                file.ids = None;
            }
        }
        file.last_used = tick;
        let bytes = file.gz.uncompressed_len() - before;
        if planned.is_none() && file.gz.uncompressed_len() >= self.settings.max_file_bytes {
            // Cut: the next record of this destination starts a new file keyed by its offset.
            file.accepting = false;
            self.open.accepting.remove(&routed.destination);
        }
        self.open.uncompressed_bytes += bytes;
        self.open.last_offset = Some(record.offset);
        self.next_offset = Some(record.offset + 1);
        Ok(Some(Appended {
            bytes,
            dead_letter: routed.dead_letter,
            heated,
            suppressed: false,
        }))
    }

    /// Starts a file of the open batch (begun at `batch_start`) whose object is keyed by
    /// `first_offset`.
    fn open_file(
        &mut self,
        destination: &Destination,
        first_offset: i64,
        batch_start: i64,
        tick: u64,
    ) -> io::Result<usize> {
        let batch_dir = layout::batch_dir(&self.dir, batch_start);
        if self.open.files.is_empty() {
            // Once a batch: its first file's directory is every file's.
            fs::create_dir_all(&batch_dir)?;
        }
        // Local files are gzip whatever the objects become (see `zstd_object`).
        let path = batch_dir.join(layout::object_name(
            &self.topic,
            self.partition,
            first_offset,
            Codec::Gzip,
        ));
        self.spares.take_to(&path);
        let gz = GzStreamFile::create(&path, self.settings.compression_level)?;
        let ids = self.settings.id_index.then(IdFilter::default);
        self.open.index_bytes += ids.as_ref().map_or(0, IdFilter::heap_bytes);
        self.open.files.push(OpenFile {
            destination: destination.clone(),
            first_offset,
            records: 0,
            gz,
            accepting: true,
            last_used: tick,
            ids,
        });
        Ok(self.open.files.len() - 1)
    }

    /// Makes the open batch end exactly at `end` (replay of a recorded intent).
    pub fn set_seal_at(&mut self, end: Option<i64>) {
        self.seal_at = end;
        self.replay_passed_end = false;
    }

    /// Whether the open batch is the replay of an intent; only reaching its end seals it.
    pub fn replaying(&self) -> bool {
        self.seal_at.is_some()
    }

    /// Kafka delivered `offset`: whether it lies past the replayed batch's end, which must then
    /// be sealed before the record is appended (the batch's last offsets hold no record).
    pub fn replay_passed(&mut self, offset: i64) -> bool {
        if self.seal_at.is_some_and(|end| offset > end) {
            self.replay_passed_end = true;
        }
        // Sealed even without a record: a replay Kafka kept none of is all gap.
        self.replay_passed_end && self.open.start.is_some()
    }

    /// During a replay: the offsets between the last record read and the batch's end, which a
    /// seal now would record as a gap.
    pub fn replay_tail(&self) -> Option<(i64, i64)> {
        let end = self.seal_at?;
        let next = match self.open.last_offset {
            Some(last) => last + 1,
            None => self.open.start?,
        };
        (next <= end).then_some((next, end))
    }

    /// During a replay: every offset up to its end was seen to be gone (the log starts past
    /// it), so it can be sealed now, as gaps.
    pub fn replay_log_passed_end(&mut self) {
        if self.seal_at.is_some() {
            self.replay_passed_end = true;
        }
    }

    /// Whether the replayed batch holds every record up to its recorded end.
    pub fn replay_complete(&self) -> bool {
        match self.seal_at {
            Some(end) => self.replay_passed_end || self.open.last_offset >= Some(end),
            None => false,
        }
    }

    /// Whether the open batch reached its size or file cap and should be sealed now. A replay
    /// is never: it ends where its intent does, with the files its first attempt opened.
    pub fn batch_full(&self) -> bool {
        self.seal_at.is_none()
            && (self.open.uncompressed_bytes >= self.settings.max_batch_bytes
                || self.open.files.len() >= self.settings.max_batch_files)
    }

    /// Files holding a compressor, as `(last_used tick, index)`.
    pub fn hot_file_ticks(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.open
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.gz.is_hot())
            .map(|(i, f)| (f.last_used, i))
    }

    /// Sync-flushes one file and drops its compressor.
    pub fn cool_file(&mut self, index: usize) -> io::Result<()> {
        self.open.files[index].gz.cool().map(|_| ())
    }

    /// Closes the open batch: finishes every file (final block, trailer, fsync) and records the
    /// sealed batch in the checkpoint before handing it out for upload. `None` if it is empty,
    /// or if it replays an intent and has not read every record up to its end yet: whatever asks
    /// (schedule, size, disk pressure, an operator), ending a replay early would skip the rest of
    /// its range as redelivered records.
    pub fn seal(&mut self) -> io::Result<Option<SealedBatch>> {
        let Some(start) = self.open.start else {
            return Ok(None);
        };
        let last = match self.open.last_offset {
            Some(last) => last,
            // A replay whose records Kafka deleted, every one: it still ends where its intent
            // says, as one batch of gaps, and an earlier attempt's objects are adopted.
            None if self.seal_at.is_some() && self.replay_passed_end => start - 1,
            None => return Ok(None),
        };
        if self.seal_at.is_some() && !self.replay_complete() {
            return Ok(None);
        }
        // A replayed batch ends where its intent says, even if its last offsets hold no record.
        let end = self.seal_at.map_or(last, |end| end.max(last));
        if end > last {
            self.record_gap(last + 1, end)?;
        }
        self.seal_at = None;
        self.replay_passed_end = false;
        let open = std::mem::replace(&mut self.open, OpenBatch::empty(Some(end + 1)));
        self.next_offset = Some(self.next_offset.map_or(end + 1, |next| next.max(end + 1)));
        // Every file finished and its writing started first, then each fsynced: the fsyncs wait
        // on writes under way together instead of one after another.
        let mut finished = Vec::with_capacity(open.files.len());
        for file in open.files {
            let path = file.gz.path().to_path_buf();
            let written = file.gz.finish_written()?;
            let sealed = SealedFile {
                destination: file.destination,
                first_offset: file.first_offset,
                records: file.records,
                path,
                stream: written.state(),
                codec: self.settings.codec,
                ids: file.ids.map(std::sync::Arc::new),
            };
            finished.push((sealed, written));
        }
        let mut files = Vec::with_capacity(finished.len());
        for (mut sealed, written) in finished {
            written.sync()?;
            if self.settings.codec == Codec::Zstd {
                let zst = sealed.path.with_extension("zst");
                sealed.stream.compressed_len = zstd_object::transcode(
                    &sealed.path,
                    &zst,
                    self.settings.zstd_level,
                    sealed.stream.uncompressed_len,
                )?;
                sealed.path = zst;
            }
            files.push(sealed);
        }
        let batch = SealedBatch {
            topic: self.topic.clone(),
            partition: self.partition,
            start,
            end,
            files,
            first_read_ms: open.first_read_ms,
            gaps: open.gaps,
            rules: self.rules.clone(),
        };
        self.plan = None;
        if let Some((router, settings, rules)) = self.after_replay.take() {
            self.router = router;
            self.settings = settings;
            self.rules = rules;
        }
        self.sealed.push(batch.clone());
        self.write_checkpoint()?;
        Ok(Some(batch))
    }

    /// Makes the open batch durable and records where reading resumes.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        for file in &mut self.open.files {
            file.gz.sync_flush()?;
            file.gz.sync_data()?;
        }
        self.write_checkpoint()
    }

    /// The group committed `next_offset`: batches below it are in S3 for good.
    pub fn committed(&mut self, next_offset: i64) -> io::Result<Vec<SealedBatch>> {
        let (done, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sealed)
            .into_iter()
            .partition(|batch| batch.end < next_offset);
        self.sealed = pending;
        if !done.is_empty() {
            // Checkpoint first: a crash between the two steps leaves extra directories, which a
            // resume removes, never a checkpoint naming deleted files.
            self.checkpoint()?;
            for batch in &done {
                for file in &batch.files {
                    self.spares.keep(&file.path);
                }
                let dir = layout::batch_dir(&self.dir, batch.start);
                if dir.exists() {
                    fs::remove_dir_all(dir)?;
                }
            }
        }
        Ok(done)
    }

    /// Drops everything local: the partition went to another consumer, which replays it.
    pub fn discard(self) -> io::Result<()> {
        drop(self.open);
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)?;
        }
        Ok(())
    }

    /// Writes the checkpoint file. Only valid when every open file was just sync-flushed (or
    /// there is none): the recorded lengths must be flush points, and `next_offset` must match
    /// what those lengths hold. `checkpoint` flushes first; `seal` leaves no open file.
    fn write_checkpoint(&self) -> io::Result<()> {
        let Some(next_offset) = self.next_offset else {
            // Nothing read yet: there is nothing to resume.
            return Ok(());
        };
        let open = match (self.open.start, self.open.last_offset) {
            (Some(start), Some(end)) => Some(BatchState {
                start,
                end,
                files: self
                    .open
                    .files
                    .iter()
                    .map(|f| FileState {
                        destination: f.destination.clone(),
                        first_offset: f.first_offset,
                        records: f.records,
                        stream: f.gz.state(),
                        accepting: f.accepting,
                        codec: Codec::Gzip,
                    })
                    .collect(),
                first_read_ms: self.open.first_read_ms,
                gaps: self.open.gaps.clone(),
                rules: self.rules.clone(),
            }),
            _ => None,
        };
        let checkpoint = Checkpoint {
            sealed: self.sealed.iter().map(SealedBatch::state).collect(),
            open,
            ..Checkpoint::new(&self.topic, self.partition, next_offset)
        };
        checkpoint::write(&self.dir, &checkpoint).map_err(|err| match err {
            checkpoint::CheckpointError::Write { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{plan_recovery, Committed, Recovery};
    use crate::config::RoutingConfig;
    use std::io::Read;

    const SETTINGS: BufferSettings = BufferSettings {
        compression_level: 6,
        max_file_bytes: 2_000,
        max_batch_bytes: 1 << 30,
        max_batch_files: 1000,
        codec: Codec::Gzip,
        zstd_level: 3,
        id_index: true,
    };

    fn event(offset: i64, source: &str, day: u32) -> Record {
        Record {
            offset,
            timestamp_ms: Some(0),
            key: None,
            payload: Some(
                format!(
                    r#"{{"projectId":"{source}","receivedAt":"2015-05-{day:02}T12:00:00Z","messageId":"m{offset}"}}"#
                )
                .into_bytes(),
            ),
            headers: vec![],
        }
    }

    fn router() -> Router {
        Router::new(&RoutingConfig::default(), "t", 0)
    }

    fn read_lines(path: &Path) -> Vec<String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn records() -> Vec<Record> {
        (100..400)
            .map(|o| event(o, ["a", "b", "c"][(o % 3) as usize], 27 + (o % 2) as u32))
            .collect()
    }

    /// Each sealed file's id filter holds the ids its lines name; a file with a line whose ids
    /// could not all be read has none (`forget` reads its object whole).
    #[test]
    fn a_files_id_filter_holds_the_ids_of_its_lines() {
        use crate::suppress::key_of;
        let dir = tempfile::tempdir().unwrap();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(0)).unwrap();
        let event = |offset: i64, source: &str, ids: &str| Record {
            offset,
            timestamp_ms: Some(0),
            key: None,
            payload: Some(
                format!(r#"{{"projectId":"{source}","receivedAt":"2015-05-27T12:00:00Z"{ids}}}"#)
                    .into_bytes(),
            ),
            headers: vec![],
        };
        let many: String = (0..5).map(|n| format!(r#","userId":"many-{n}""#)).collect();
        let records = [
            event(0, "a", r#","userId":"u1","anonymousId":"a1""#),
            event(1, "a", r#","userId":42"#),
            event(2, "b", r#","anonymousId":"a2""#),
            event(3, "c", &many),
        ];
        for (tick, record) in records.iter().enumerate() {
            buffer.append(record, tick as u64).unwrap().unwrap();
        }
        let batch = buffer.seal().unwrap().unwrap();
        let filter = |source: &str| {
            let file = batch.files.iter().find(
                |f| matches!(&f.destination, Destination::Events { source: s, .. } if s == source),
            );
            file.unwrap().ids.clone()
        };
        let a = filter("a").expect("a filter");
        assert!(["u1", "a1", "42"]
            .iter()
            .all(|id| a.may_contain(key_of(id))));
        assert!(!a.may_contain(key_of("a2")));
        let b = filter("b").expect("a filter");
        assert!(b.may_contain(key_of("a2")) && !b.may_contain(key_of("u1")));
        assert!(
            filter("c").is_none(),
            "a line naming more ids than are kept"
        );

        // A flood of distinct ids: a file's filter is dropped past its cap, and so are those
        // that grow once the batch's filters hold their cap.
        let one_file_each = BufferSettings {
            max_file_bytes: 1 << 30,
            ..SETTINGS
        };
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), one_file_each, Some(0)).unwrap();
        for offset in 0..6_000 {
            let (source, user) = if offset < 5_000 {
                ("flood", offset + 10_000)
            } else {
                ("calm", offset % 1_000)
            };
            let record = event(offset, source, &format!(r#","userId":"u{user}""#));
            buffer.append(&record, offset as u64).unwrap().unwrap();
        }
        let batch = buffer.seal().unwrap().unwrap();
        let of = |source: &str| {
            let file = batch.files.iter().find(
                |f| matches!(&f.destination, Destination::Events { source: s, .. } if s == source),
            );
            file.unwrap().ids.clone()
        };
        assert!(of("flood").is_none(), "5,000 distinct ids pass 8 KiB");
        let calm = of("calm").expect("1,000 ids stay under it");
        assert!(calm.may_contain(key_of("u999")));
    }

    #[test]
    fn records_are_routed_cut_and_sealed_deterministically() {
        let run = || {
            let dir = tempfile::tempdir().unwrap();
            let mut buffer =
                PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
            for (tick, record) in records().iter().enumerate() {
                buffer.append(record, tick as u64).unwrap().unwrap();
            }
            let batch = buffer.seal().unwrap().unwrap();
            let files: Vec<(Destination, i64, u64, Vec<String>)> = batch
                .files
                .iter()
                .map(|f| {
                    (
                        f.destination.clone(),
                        f.first_offset,
                        f.records,
                        read_lines(&f.path),
                    )
                })
                .collect();
            (batch.start, batch.end, files)
        };
        let (start, end, files) = run();
        assert_eq!((start, end), (100, 399));
        // 6 destinations, each cut at 2000 bytes (~80 bytes a line, 50 lines each).
        assert!(files.len() > 6, "{} files", files.len());
        let total: u64 = files.iter().map(|f| f.2).sum();
        assert_eq!(total, 300);
        for (_, first_offset, records, lines) in &files {
            assert_eq!(lines.len() as u64, *records);
            assert!(lines[0].contains(&format!("\"m{first_offset}\"")));
        }
        assert_eq!(run().2, files, "a replay makes the same files");
    }

    /// A batch's first attempt over `records()`, sealed: its directory, buffer and plan.
    fn first_attempt() -> (
        tempfile::TempDir,
        PartitionBuffer,
        crate::pipeline::KeptIntent,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        for (tick, record) in records().iter().enumerate() {
            buffer.append(record, tick as u64).unwrap();
        }
        let planned = crate::pipeline::KeptIntent::of_batch(&buffer.seal().unwrap().unwrap(), &[]);
        (dir, buffer, planned)
    }

    #[test]
    fn a_replay_whose_head_kafka_deleted_cuts_where_its_first_attempt_did() {
        let (_first_attempt, buffer, planned) = first_attempt();
        let planned_lines: HashMap<(Destination, i64), Vec<String>> = buffer.sealed()[0]
            .files
            .iter()
            .map(|f| ((f.destination.clone(), f.first_offset), read_lines(&f.path)))
            .collect();

        // Retention took offsets below 230: the replay's first record of each destination is
        // in the middle of the first attempt's file, which a size cut would start there.
        let replay_dir = tempfile::tempdir().unwrap();
        let replay = |plan: &[PlannedFile]| {
            let mut buffer =
                PartitionBuffer::fresh(replay_dir.path(), "t", 0, router(), SETTINGS, Some(100))
                    .unwrap();
            buffer.set_seal_at(Some(399));
            buffer.cut_as_planned(plan);
            buffer.set_log_start(Some(230));
            for record in &records()[130..] {
                buffer.append(record, 0).unwrap();
            }
            buffer.seal().unwrap().unwrap()
        };
        let unplanned = replay(&[]);
        let moved = unplanned
            .files
            .iter()
            .filter(|f| !planned_lines.contains_key(&(f.destination.clone(), f.first_offset)))
            .count();
        assert!(moved > 0, "without the plan the cuts move");

        let batch = replay(&planned.files);
        assert_eq!((batch.start, batch.end), (100, 399));
        assert_eq!(batch.records(), 170);
        for file in &batch.files {
            let key = (file.destination.clone(), file.first_offset);
            let first = &planned_lines[&key];
            let lines = read_lines(&file.path);
            assert!(
                first.ends_with(&lines),
                "{key:?}: the last lines of the first attempt's"
            );
            if file.first_offset >= 230 {
                assert_eq!(
                    &lines, first,
                    "{key:?}: untouched by retention, the same file"
                );
            }
        }
        assert_eq!(
            batch.gaps,
            vec![Gap {
                first: 100,
                last: 229,
                cause: GapCause::Deleted
            }]
        );
    }

    /// Retention overtakes a replay mid-read (it read offsets 100..159, then Kafka's log starts
    /// at 250, or past the batch's end): it keeps no line Kafka no longer holds, so its files
    /// hold the last lines of the planned ones like any replay whose head Kafka deleted, and a
    /// later attempt's objects and its own can be adopted one by the other.
    #[test]
    fn a_replay_retention_overtakes_mid_read_keeps_only_lines_from_the_log_start() {
        let (_first_attempt, _, planned) = first_attempt();
        let replay = |dir: &Path, read_first: usize, log_start: i64| {
            let mut buffer =
                PartitionBuffer::fresh(dir, "t", 0, router(), SETTINGS, Some(100)).unwrap();
            buffer.set_seal_at(Some(399));
            buffer.cut_as_planned(&planned.files);
            buffer.set_log_start(Some(100));
            for record in &records()[..read_first] {
                buffer.append(record, 0).unwrap();
            }
            buffer.checkpoint().unwrap();
            buffer.set_log_start(Some(log_start));
            buffer
        };
        let lines = |batch: &SealedBatch| -> Vec<((Destination, i64), Vec<String>)> {
            let mut files: Vec<_> = batch
                .files
                .iter()
                .map(|f| ((f.destination.clone(), f.first_offset), read_lines(&f.path)))
                .collect();
            files.sort();
            files
        };

        // Kafka's log starts at 250 when the replay has read up to 159.
        let (overtaken, later) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut buffer = replay(overtaken.path(), 60, 250);
        for record in &records()[150..] {
            buffer.append(record, 0).unwrap();
        }
        let batch = buffer.seal().unwrap().unwrap();
        let deleted_head = vec![Gap {
            first: 100,
            last: 249,
            cause: GapCause::Deleted,
        }];
        assert_eq!(batch.gaps, deleted_head);
        assert_eq!(batch.records(), 150, "offsets 250..399");
        let mut from_the_log_start = replay(later.path(), 0, 250);
        for record in &records()[150..] {
            from_the_log_start.append(record, 0).unwrap();
        }
        let expected = from_the_log_start.seal().unwrap().unwrap();
        assert_eq!(lines(&batch), lines(&expected), "as if it began at 250");
        let kept = crate::pipeline::KeptIntent::of_batch(&batch, &planned.files);
        assert_eq!(kept.intent.kept_from, Some(250));
        assert_eq!(kept.files, planned.files, "still cut as first planned");

        // Kafka's log starts past the batch's end: a batch of gaps, no file.
        let past = tempfile::tempdir().unwrap();
        let mut buffer = replay(past.path(), 60, 450);
        assert!(buffer.replay_passed(450));
        let batch = buffer.seal().unwrap().unwrap();
        assert!(batch.files.is_empty());
        assert_eq!(
            batch.gaps,
            vec![Gap {
                first: 100,
                last: 399,
                cause: GapCause::Deleted
            }]
        );
        assert_eq!(buffer.next_offset(), Some(400));

        // The read files are gone and the checkpoint says so at once: a crash before the next
        // one resumes from a consistent point, not from files this replay no longer holds.
        let crashed = tempfile::tempdir().unwrap();
        let mut buffer = replay(crashed.path(), 60, 250);
        buffer.append(&records()[150], 0).unwrap();
        drop(buffer);
        let checkpoint = checkpoint::read(&layout::partition_dir(crashed.path(), "t", 0))
            .unwrap()
            .unwrap();
        let open = checkpoint.open.as_ref().unwrap();
        assert_eq!((open.start, open.end), (100, 249));
        assert_eq!((open.files.len(), open.gaps.clone()), (0, deleted_head));
        assert_eq!(checkpoint.next_offset, 250);
        PartitionBuffer::resume(crashed.path(), router(), SETTINGS, checkpoint).unwrap();
    }

    #[test]
    fn a_replay_kafka_kept_no_record_of_is_sealed_as_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        buffer.set_seal_at(Some(199));
        buffer.set_log_start(Some(250));
        assert_eq!(buffer.replay_tail(), Some((100, 199)));
        assert_eq!(buffer.seal().unwrap(), None, "not before Kafka said so");
        buffer.replay_log_passed_end();
        let batch = buffer.seal().unwrap().unwrap();
        assert_eq!((batch.start, batch.end, batch.records()), (100, 199, 0));
        assert_eq!(
            batch.gaps,
            vec![Gap {
                first: 100,
                last: 199,
                cause: GapCause::Deleted
            }]
        );
        // The next batch starts after it.
        assert!(buffer.append(&event(250, "a", 27), 0).unwrap().is_some());
        assert_eq!(buffer.seal().unwrap().unwrap().start, 200);
    }

    #[test]
    fn a_resumed_partition_continues_into_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let all = records();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        for (tick, record) in all[..150].iter().enumerate() {
            buffer.append(record, tick as u64).unwrap();
        }
        buffer.checkpoint().unwrap();
        for (tick, record) in all[150..200].iter().enumerate() {
            buffer.append(record, tick as u64).unwrap();
        }
        drop(buffer); // a crash: appends after the checkpoint are lost locally

        let checkpoint = checkpoint::read(&layout::partition_dir(dir.path(), "t", 0))
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.next_offset, 250);
        let Recovery::FromCheckpoint { checkpoint, .. } =
            plan_recovery(Some(checkpoint), "t", 0, Committed::Offset(100), None)
        else {
            panic!("should resume")
        };
        let mut buffer =
            PartitionBuffer::resume(dir.path(), router(), SETTINGS, checkpoint).unwrap();
        assert_eq!(buffer.next_offset(), Some(250));
        // Kafka redelivers from 250; anything older is ignored.
        assert_eq!(buffer.append(&all[0], 0).unwrap(), None);
        for record in &all[150..] {
            buffer.append(record, 0).unwrap();
        }
        let resumed = buffer.seal().unwrap().unwrap();

        let reference_dir = tempfile::tempdir().unwrap();
        let mut reference =
            PartitionBuffer::fresh(reference_dir.path(), "t", 0, router(), SETTINGS, Some(100))
                .unwrap();
        for record in &all {
            reference.append(record, 0).unwrap();
        }
        let reference = reference.seal().unwrap().unwrap();
        let contents = |batch: &SealedBatch| -> Vec<(Destination, i64, Vec<String>)> {
            batch
                .files
                .iter()
                .map(|f| (f.destination.clone(), f.first_offset, read_lines(&f.path)))
                .collect()
        };
        assert_eq!(contents(&resumed), contents(&reference));
        assert_eq!((resumed.start, resumed.end), (100, 399));
    }

    #[test]
    fn a_checkpoint_written_on_commit_is_a_consistent_resume_point() {
        let dir = tempfile::tempdir().unwrap();
        let all = records();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        for record in &all[..100] {
            buffer.append(record, 0).unwrap();
        }
        buffer.seal().unwrap().unwrap();
        // Records still inside the compressors when the commit of the first batch arrives.
        for record in &all[100..130] {
            buffer.append(record, 0).unwrap();
        }
        buffer.committed(200).unwrap();
        drop(buffer); // crash

        let checkpoint = checkpoint::read(&layout::partition_dir(dir.path(), "t", 0))
            .unwrap()
            .unwrap();
        let Recovery::FromCheckpoint { checkpoint, .. } =
            plan_recovery(Some(checkpoint), "t", 0, Committed::Offset(200), None)
        else {
            panic!("should resume")
        };
        let mut buffer =
            PartitionBuffer::resume(dir.path(), router(), SETTINGS, checkpoint).unwrap();
        let next = buffer.next_offset().unwrap();
        for record in all.iter().filter(|r| r.offset >= next) {
            buffer.append(record, 0).unwrap();
        }
        let batch = buffer.seal().unwrap().unwrap();
        let lines: usize = batch.files.iter().map(|f| read_lines(&f.path).len()).sum();
        assert_eq!((batch.start, batch.end, lines), (200, 399, 200));
    }

    /// Whatever asks for a seal (disk pressure, the schedule, an operator), a replay of `[S, E]`
    /// ends at `E` and holds every record up to it: ending early would skip `last+1..E` as
    /// redelivered, a silent loss.
    #[test]
    fn a_replay_is_never_sealed_before_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let all = records();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        buffer.set_seal_at(Some(299));
        for record in &all[..100] {
            buffer.append(record, 0).unwrap().unwrap();
        }
        assert_eq!(
            buffer.seal().unwrap(),
            None,
            "sealed a replay at offset 199 of 299"
        );
        assert!(buffer.replaying());
        for record in &all[100..200] {
            buffer.append(record, 0).unwrap().unwrap();
        }
        assert!(buffer.replay_complete());
        let batch = buffer.seal().unwrap().unwrap();
        assert_eq!((batch.start, batch.end, batch.records()), (100, 299, 200));
        assert!(!buffer.replaying());
    }

    /// A producer that gives every record a source of its own opens a file per record: the
    /// batch is full at its file cap, and every file counts at least a block on disk.
    #[test]
    fn a_batch_is_full_at_its_file_cap_and_a_file_costs_at_least_a_block() {
        let settings = BufferSettings {
            max_batch_files: 10,
            ..SETTINGS
        };
        let distinct = |offset: i64| event(offset, &format!("source-{offset}"), 27);
        let dir = tempfile::tempdir().unwrap();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), settings, Some(0)).unwrap();
        for offset in 0..9 {
            buffer.append(&distinct(offset), 0).unwrap().unwrap();
            assert!(!buffer.batch_full(), "full at {} files", offset + 1);
        }
        buffer.append(&distinct(9), 0).unwrap().unwrap();
        assert!(buffer.batch_full(), "10 files: the cap");
        assert_eq!(buffer.open_files(), 10);
        assert!(buffer.disk_bytes() >= 10 * crate::pipeline::MIN_FILE_DISK_BYTES);
        let batch = buffer.seal().unwrap().unwrap();
        assert_eq!((batch.start, batch.end, batch.files.len()), (0, 9, 10));
        assert!(buffer.disk_bytes() >= 10 * crate::pipeline::MIN_FILE_DISK_BYTES);

        // A replay of a batch cut under a larger cap opens every file its first attempt did.
        let replay_dir = tempfile::tempdir().unwrap();
        let mut replay =
            PartitionBuffer::fresh(replay_dir.path(), "t", 0, router(), settings, Some(0)).unwrap();
        replay.set_seal_at(Some(19));
        for offset in 0..19 {
            replay.append(&distinct(offset), 0).unwrap().unwrap();
            assert!(!replay.batch_full(), "a replay cut at {} files", offset + 1);
        }
        replay.append(&distinct(19), 0).unwrap().unwrap();
        let batch = replay.seal().unwrap().unwrap();
        assert_eq!((batch.start, batch.end, batch.files.len()), (0, 19, 20));
    }

    /// A replayed batch whose last offsets hold no record (compacted away, transaction markers)
    /// ends when Kafka delivers an offset past its end, and not before.
    #[test]
    fn a_replay_with_a_gap_at_its_end_seals_once_the_log_passes_it() {
        let dir = tempfile::tempdir().unwrap();
        let all = records();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        buffer.set_seal_at(Some(299));
        for record in &all[..150] {
            buffer.append(record, 0).unwrap().unwrap();
        }
        assert_eq!(buffer.seal().unwrap(), None);
        assert!(!buffer.replay_passed(299));
        assert!(buffer.replay_passed(305), "offset 305 lies past the end");
        let batch = buffer.seal().unwrap().unwrap();
        assert_eq!((batch.start, batch.end, batch.records()), (100, 299, 150));
        assert_eq!(buffer.next_offset(), Some(300));
        assert_eq!(
            batch.gaps,
            vec![Gap {
                first: 250,
                last: 299,
                cause: GapCause::NoRecord
            }]
        );
    }

    /// Every offset of a batch is a record or in a gap: offsets deleted before the partition was
    /// read (retention while a batch waited to be replayed), and offsets that held no record.
    #[test]
    fn a_batch_accounts_for_every_offset_with_its_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let all = records();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        // The group committed 100, but the log now starts at 150.
        buffer.set_log_start(Some(150));
        for record in all.iter().filter(|r| (150..200).contains(&r.offset)) {
            buffer.append(record, 0).unwrap().unwrap();
        }
        // 200..=204 compacted away.
        for record in all.iter().filter(|r| (205..210).contains(&r.offset)) {
            buffer.append(record, 0).unwrap().unwrap();
        }
        buffer.checkpoint().unwrap();
        drop(buffer);
        // The gaps survive a restart on the same volume.
        let checkpoint = checkpoint::read(&layout::partition_dir(dir.path(), "t", 0))
            .unwrap()
            .unwrap();
        let mut buffer =
            PartitionBuffer::resume(dir.path(), router(), SETTINGS, checkpoint).unwrap();
        let batch = buffer.seal().unwrap().unwrap();
        assert_eq!(
            batch.gaps,
            vec![
                Gap {
                    first: 100,
                    last: 149,
                    cause: GapCause::Deleted
                },
                Gap {
                    first: 200,
                    last: 204,
                    cause: GapCause::NoRecord
                },
            ]
        );
        let gaps: u64 = batch.gaps.iter().map(Gap::offsets).sum();
        assert_eq!(
            batch.records() + gaps,
            (batch.end - batch.start + 1) as u64,
            "[{}, {}]",
            batch.start,
            batch.end
        );
    }

    #[test]
    fn sealed_batches_survive_a_restart_and_go_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        for record in &records()[..100] {
            buffer.append(record, 0).unwrap();
        }
        // A restart forgets the files' id filters (their objects are read whole by `forget`).
        let without_ids = |mut batch: SealedBatch| {
            batch.files.iter_mut().for_each(|f| f.ids = None);
            batch
        };
        let first = without_ids(buffer.seal().unwrap().unwrap());
        for record in &records()[100..] {
            buffer.append(record, 0).unwrap();
        }
        let second = without_ids(buffer.seal().unwrap().unwrap());
        assert_eq!(
            (first.start, first.end, second.start, second.end),
            (100, 199, 200, 399)
        );
        drop(buffer);

        let pdir = layout::partition_dir(dir.path(), "t", 0);
        let checkpoint = checkpoint::read(&pdir).unwrap();
        let Recovery::FromCheckpoint { checkpoint, .. } =
            plan_recovery(checkpoint, "t", 0, Committed::Offset(100), None)
        else {
            panic!("should resume")
        };
        let mut buffer =
            PartitionBuffer::resume(dir.path(), router(), SETTINGS, checkpoint).unwrap();
        assert_eq!(buffer.sealed(), &[first.clone(), second.clone()]);
        let done = buffer.committed(200).unwrap();
        assert_eq!(done, vec![first.clone()]);
        assert!(!layout::batch_dir(&pdir, 100).exists());
        assert!(layout::batch_dir(&pdir, 200).exists());
        buffer.discard().unwrap();
        assert!(!pdir.exists());
    }

    /// A committed batch's files become the next batch's (the same inodes, emptied), up to the
    /// cap; each new file holds exactly its own lines, and a resume drops the spares.
    #[test]
    fn committed_files_are_emptied_and_become_the_next_batchs_files() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pdir = layout::partition_dir(dir.path(), "t", 0);
        let mut buffer =
            PartitionBuffer::fresh(dir.path(), "t", 0, router(), SETTINGS, Some(100)).unwrap();
        for record in &records()[..150] {
            buffer.append(record, 0).unwrap();
        }
        let first = buffer.seal().unwrap().unwrap();
        assert!(
            first.files.len() > MAX_SPARE_FILES,
            "more files than spares"
        );
        let inodes = |batch: &SealedBatch| -> Vec<u64> {
            batch
                .files
                .iter()
                .map(|f| fs::metadata(&f.path).unwrap().ino())
                .collect()
        };
        buffer.committed(250).unwrap();
        let spares: Vec<_> = fs::read_dir(layout::spare_dir(&pdir))
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap())
            .collect();
        assert_eq!(spares.len(), MAX_SPARE_FILES);
        assert!(spares.iter().all(|spare| spare.len() == 0));
        assert!(!layout::batch_dir(&pdir, 100).exists());

        for record in &records()[150..] {
            buffer.append(record, 0).unwrap();
        }
        let second = buffer.seal().unwrap().unwrap();
        let second_inodes = inodes(&second);
        assert!(
            spares
                .iter()
                .all(|spare| second_inodes.contains(&spare.ino())),
            "every spare became a file of the second batch"
        );
        let mut lines = 0;
        for file in &second.files {
            let read = read_lines(&file.path);
            assert_eq!(read.len() as u64, file.records);
            assert!(read[0].contains(&format!("\"m{}\"", file.first_offset)));
            lines += read.len();
        }
        assert_eq!(lines, 150, "the second batch holds its own lines only");
        assert_eq!(fs::read_dir(layout::spare_dir(&pdir)).unwrap().count(), 0);

        // The spares of a partition that stopped are leftovers: a resume removes them.
        buffer.committed(400).unwrap();
        assert!(layout::spare_dir(&pdir).exists());
        buffer.append(&event(400, "a", 27), 0).unwrap();
        buffer.checkpoint().unwrap();
        drop(buffer);
        let checkpoint = checkpoint::read(&pdir).unwrap();
        let Recovery::FromCheckpoint { checkpoint, .. } =
            plan_recovery(checkpoint, "t", 0, Committed::Offset(400), None)
        else {
            panic!("should resume")
        };
        PartitionBuffer::resume(dir.path(), router(), SETTINGS, checkpoint).unwrap();
        assert!(!layout::spare_dir(&pdir).exists());
    }
}
