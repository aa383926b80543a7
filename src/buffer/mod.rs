//! Route and buffer: worker threads that own the partitions' local batches. The poll loop sends
//! them records and control commands over a bounded channel (one per worker, so a partition's
//! records and its assign/revoke/commit commands stay in order); they route, compress, checkpoint
//! and seal, and hand sealed batches to the uploader.
//!
//! Routing and compression are CPU work and the files are blocking I/O, so they run here on
//! plain threads — partitions spread over one worker per core — never on the async executor and
//! never on the Kafka poll thread.

pub mod gzfile;
pub mod partition;
pub mod zstd_object;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::buffer::gzfile::MAX_STAGE_BYTES;
use crate::checkpoint::{self, plan_recovery, Committed, Recovery};
use crate::config::Config;
use crate::metrics::events::{BatchReplayed, BatchSealed, RecordsDeletedBeforeArchived};
use crate::metrics::Metrics;
use crate::pipeline::{
    Assigned, BatchIntent, BufferError, PlannedFile, QueuedRecords, Record, ReplayCut, SealTrigger,
    UploadJob, WorkerCommand,
};
use crate::route::Router;
use crate::rules::CuttingRules;
use crate::suppress::{CurrentList, Suppression};

pub use partition::{BufferSettings, PartitionBuffer};

/// Uncompressed bytes the whole process may hold staged in its open files (see
/// `gzfile`): each file stages up to this divided by the open files, so a few hundred files get
/// chunks of tens of kilobytes and twelve thousand (the memory benchmark) a few lines each.
/// Every chunk pulls a cold ~300 KB deflate state into the cache, so larger chunks cost less
/// per byte: twice the 32 MiB it was (40 KB chunks instead of 20 for 1,600 files) took the
/// buffer workers' CPU down by about 15 %, paid for by halving the queue of records in `app`
/// (BENCHMARKS.md, "Larger chunks").
pub const STAGING_BUDGET_BYTES: usize = 64 << 20;

/// Below this a chunk no longer keeps the compressor's cache warm long enough to matter, so the
/// budget is exceeded rather than staging less.
const MIN_STAGE_BYTES: usize = 1 << 10;

/// Shared by all workers: what the local volume holds, for early sealing and pausing, and which
/// partitions replay an intent (the poll loop never pauses those).
#[derive(Debug, Default)]
pub struct DiskUsage {
    bytes: AtomicU64,
    replaying: std::sync::Mutex<HashSet<i32>>,
}

impl DiskUsage {
    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Partitions whose open batch replays a recorded intent.
    pub fn replaying(&self) -> HashSet<i32> {
        self.replaying.lock().expect("replaying lock").clone()
    }
}

/// The first offset a partition's log holds now, if the broker answers: asked when records
/// arrive after a jump, because only the log start tells offsets retention deleted (loss, to be
/// reported) from offsets that never held a record (compaction, transaction markers).
pub type LogStarts = Arc<dyn Fn(i32) -> Option<i64> + Send + Sync>;

/// Whether a worker goes on after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Running,
    /// `Stop` was handled: everything is checkpointed.
    Stopped,
}

/// One buffer worker: owns some partitions and their files.
/// The start of a local batch overlapping `intent` that cannot be continued into the files its
/// first upload cut (`planned`, as the bucket keeps them; empty: nothing to compare with): a
/// sealed batch must hold exactly those files, an open one only files of the plan, none
/// longer. Another member may have recorded the intent while this volume's batch waited, after
/// Kafka deleted records this batch had read.
fn unplanned_local_batch(
    checkpoint: &crate::checkpoint::Checkpoint,
    intent: &BatchIntent,
    planned: &[PlannedFile],
) -> Option<i64> {
    if planned.is_empty() {
        return None;
    }
    let plan: HashMap<(&crate::layout::Destination, i64), &PlannedFile> = planned
        .iter()
        .map(|file| ((&file.destination, file.first_offset), file))
        .collect();
    let overlaps =
        |b: &&crate::checkpoint::BatchState| b.start <= intent.end && b.end >= intent.start;
    let sealed_differs = checkpoint.sealed.iter().filter(overlaps).find(|batch| {
        batch.files.len() != plan.len()
            || batch.files.iter().any(|f| {
                plan.get(&(&f.destination, f.first_offset))
                    .is_none_or(|p| (p.records, p.crc32) != (f.records, f.stream.crc32))
            })
    });
    let open_differs = checkpoint.open.iter().filter(overlaps).find(|batch| {
        batch.files.iter().any(|f| {
            plan.get(&(&f.destination, f.first_offset))
                .is_none_or(|p| f.records > p.records)
        })
    });
    sealed_differs.or(open_differs).map(|batch| batch.start)
}

/// The start of a local batch of `intent`'s range holding records below where an attempt of it
/// found Kafka's log beginning (`BatchIntent::kept_from`), with that offset. Such an attempt's
/// objects hold the last lines of the planned files; a copy with more lines could neither
/// replace them nor be accounted for beside them, so the partition is read from Kafka again.
fn lines_below_kept(
    checkpoint: &crate::checkpoint::Checkpoint,
    intent: &BatchIntent,
) -> Option<(i64, i64)> {
    let kept_from = intent.kept_from?;
    // Lines below `kept_from` unless gaps of any cause run on from its start to there.
    let holds_lines_below = |b: &crate::checkpoint::BatchState| {
        crate::pipeline::gap_run_from(&b.gaps, b.start).0 + 1 < kept_from
    };
    checkpoint
        .batches()
        .filter(|b| b.start <= intent.end && b.end >= intent.start)
        .find(|b| holds_lines_below(b))
        .map(|b| (b.start, kept_from))
}

/// What an assignment says of the interrupted batch a partition replays, if any.
struct Replay {
    /// The intent the group's commit (or the bucket) holds.
    intent: Option<BatchIntent>,
    /// The rules it was cut with, when they are not this member's own.
    rules: Option<Box<ReplayCut>>,
    /// The files its first upload cut, as the bucket keeps them.
    planned_files: Vec<PlannedFile>,
}

pub struct Worker {
    data_dir: PathBuf,
    topic: String,
    config: Arc<Config>,
    settings: BufferSettings,
    partitions: HashMap<i32, (u64, PartitionBuffer)>,
    uploads: UnboundedSender<UploadJob>,
    metrics: Metrics,
    disk: Arc<DiskUsage>,
    /// This worker's share of the global compressor cap.
    max_hot_files: usize,
    /// This worker's share of [`STAGING_BUDGET_BYTES`], spread over its open files.
    staging_budget: usize,
    /// The highest stage limit a partition was given since all were last fitted to one: what
    /// a file's staging may hold. A partition's limit is set when its records come, so one
    /// read early (a backlog comes partition by partition) kept lines staged under a limit
    /// for a few hundred files while thousands opened: the memory benchmark's 12,800 files
    /// staged 81 MB for a budget of 32 MiB (as it was then).
    stage_limit_given: usize,
    hot_files: usize,
    /// Monotonic counter standing in for time in the coldest-file choice.
    tick: u64,
    /// This member's cutting rules without a suppression list, and their hash.
    base_rules: (CuttingRules, String),
    /// The suppression list new batches are cut with, as the member last took it up.
    suppression: Arc<CurrentList>,
    /// That list with the hash of the rules naming it (`base_rules` when there is none): the
    /// rules this member cuts new batches with. Refreshed when the list changes.
    own: (Option<Arc<Suppression>>, String),
    /// Where each partition's log starts now (see [`LogStarts`]).
    log_starts: LogStarts,
    /// This worker's last contributions to the shared figures.
    disk_bytes: u64,
    reported_files: usize,
    reported_hot: usize,
}

impl Worker {
    pub fn new(
        config: Arc<Config>,
        worker_count: usize,
        uploads: UnboundedSender<UploadJob>,
        metrics: Metrics,
        disk: Arc<DiskUsage>,
        log_starts: LogStarts,
    ) -> Worker {
        Worker {
            log_starts,
            data_dir: config.buffer.data_dir.clone(),
            topic: config.kafka.topic.clone(),
            settings: BufferSettings {
                compression_level: config.buffer.compression_level,
                max_file_bytes: config.buffer.max_file_bytes,
                max_batch_bytes: config.buffer.max_batch_bytes,
                max_batch_files: config.buffer.max_batch_files,
                codec: config.output.compression,
                zstd_level: config.output.zstd_level,
                id_index: config.output.id_index,
            },
            max_hot_files: (config.buffer.max_open_compressors / worker_count).max(1),
            staging_budget: STAGING_BUDGET_BYTES / worker_count.max(1),
            stage_limit_given: MAX_STAGE_BYTES,
            base_rules: (CuttingRules::of(&config), CuttingRules::of(&config).hash()),
            suppression: Arc::new(CurrentList::default()),
            own: (None, CuttingRules::of(&config).hash()),
            config,
            partitions: HashMap::new(),
            uploads,
            metrics,
            disk,
            hot_files: 0,
            tick: 0,
            disk_bytes: 0,
            reported_files: 0,
            reported_hot: 0,
        }
    }

    /// Cuts each partition's batches, from the next one on, with the suppression list `current`
    /// holds whenever it changes.
    pub fn with_suppression(self, current: Arc<CurrentList>) -> Worker {
        Worker {
            suppression: current,
            ..self
        }
    }

    /// The suppression list and the hash of the rules new batches are cut with now.
    fn own(&mut self) -> (Option<Arc<Suppression>>, String) {
        let list = self.suppression.get();
        let same = match (&list, &self.own.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            let rules = self.base_rules.0.clone().with_suppression(list.as_deref());
            self.own = (list, rules.hash());
        }
        self.own.clone()
    }

    /// Runs until `Stop` or until the poll loop goes away. An I/O error is fatal: the process
    /// stops, and what was not committed is resumed or replayed by the next run.
    /// Handles commands until told to stop; the bytes of each `Records` command are given back
    /// to `queued` once handled.
    pub fn run(
        mut self,
        commands: Receiver<WorkerCommand>,
        queued: &QueuedRecords,
    ) -> Result<(), BufferError> {
        while let Ok(command) = commands.recv() {
            let bytes = match &command {
                WorkerCommand::Records { records, .. } => {
                    records.iter().map(Record::held_bytes).sum()
                }
                _ => 0,
            };
            let flow = self.handle(command);
            queued.written(bytes);
            if flow? == Flow::Stopped {
                return Ok(());
            }
        }
        self.checkpoint_all()
    }

    /// Carries out one command: the whole of what a worker does, one step at a time (the
    /// simulation drives workers through this, in the order its seed says).
    pub fn handle(&mut self, command: WorkerCommand) -> Result<Flow, BufferError> {
        match command {
            WorkerCommand::Assign {
                partition,
                epoch,
                committed,
                intent,
                log_start,
                replay_rules,
                planned_files,
                reply,
            } => {
                let replay = Replay {
                    intent,
                    rules: replay_rules,
                    planned_files,
                };
                let result = self.assign(partition, epoch, committed, log_start, replay);
                let failed = result.as_ref().err().map(|e| e.to_string());
                let _ = reply.send(result);
                if let Some(err) = failed {
                    tracing::error!(partition, error = %err, "cannot set up partition buffer");
                }
            }
            WorkerCommand::Revoke {
                partition,
                keep_local,
                reply,
            } => {
                let result = self.revoke(partition, keep_local);
                let _ = reply.send(());
                result?;
            }
            WorkerCommand::Records { partition, records } => {
                self.append(partition, &records)?;
            }
            WorkerCommand::SealAll { trigger } => {
                // A replayed batch ignores the schedule: it ends where its intent says.
                let partitions: Vec<i32> = self
                    .partitions
                    .iter()
                    .filter(|(_, (_, buffer))| !buffer.replaying())
                    .map(|(&partition, _)| partition)
                    .collect();
                for partition in partitions {
                    self.seal(partition, trigger)?;
                }
            }
            WorkerCommand::Checkpoint => self.checkpoint_all()?,
            WorkerCommand::Committed {
                partition,
                next_offset,
            } => {
                if let Some((_, buffer)) = self.partitions.get_mut(&partition) {
                    buffer
                        .committed(next_offset)
                        .map_err(|source| BufferError::Io { partition, source })?;
                }
                self.refresh_disk_usage();
            }
            WorkerCommand::Stop { reply } => {
                let result = self.checkpoint_all();
                let _ = reply.send(());
                result?;
                return Ok(Flow::Stopped);
            }
        }
        Ok(Flow::Running)
    }

    fn assign(
        &mut self,
        partition: i32,
        epoch: u64,
        committed: Committed,
        log_start: Option<i64>,
        replay: Replay,
    ) -> Result<Assigned, BufferError> {
        let Replay {
            intent,
            rules: replay_rules,
            planned_files,
        } = replay;
        let io = |source| BufferError::Io { partition, source };
        let (own_list, own_rules) = self.own();
        let router =
            Router::new(&self.config.routing, &self.topic, partition).with_suppression(own_list);
        let replay_hash = replay_rules.as_ref().map(|cut| cut.rules.hash());
        let dir = crate::layout::partition_dir(&self.data_dir, &self.topic, partition);
        let local = match checkpoint::read(&dir) {
            Ok(local) => local,
            Err(err) => {
                tracing::warn!(partition, error = %err, "ignoring unreadable checkpoint");
                None
            }
        };
        // A local batch is continued only under the rules it was cut with: those of the intent
        // it replays (another member may have recorded it under new rules while this one's
        // batch waited on its volume), this member's own after that. Otherwise the settings
        // changed across a restart, or a rolling change overtook it: read again from the commit.
        let intent_rules = intent
            .as_ref()
            .filter(|intent| !intent.is_legacy())
            .map(|intent| (intent.end, intent.rules.clone()));
        let local = local.filter(|checkpoint| {
            let foreign = checkpoint.batches().find(|b| {
                let expected = match &intent_rules {
                    Some((end, rules)) if b.start <= *end => rules,
                    _ => &own_rules,
                };
                // An earlier release's batch is unlabelled and was cut without a list.
                (b.rules.is_empty() && own_rules != self.base_rules.1)
                    || (!b.rules.is_empty() && b.rules != *expected)
            });
            if let Some(batch) = foreign {
                tracing::warn!(partition, start = batch.start, rules = %batch.rules, "local batches were cut under other rules; reading from the committed offset");
                return false;
            }
            if let Some((start, kept_from)) = intent.as_ref().and_then(|i| lines_below_kept(checkpoint, i)) {
                tracing::warn!(partition, start, kept_from, "an attempt of the batch read it after Kafka deleted its head and may have put its last lines: a local copy holding more lines cannot go up beside them; reading from the committed offset");
                return false;
            }
            let unplanned = intent.as_ref().and_then(|i| unplanned_local_batch(checkpoint, i, &planned_files));
            if let Some(start) = unplanned {
                tracing::warn!(partition, start, "a local batch holds other files than the intent's first upload (it read records Kafka deleted since, or an attempt of its own); reading from the committed offset");
            }
            unplanned.is_none()
        });
        let recorded = intent.as_ref().map(|i| (i.start, i.end));
        let plan = plan_recovery(local, &self.topic, partition, committed, recorded);
        let (resumed, seal_at) = match plan {
            Recovery::FromCheckpoint {
                checkpoint,
                seal_at,
            } => {
                let next = checkpoint.next_offset;
                match PartitionBuffer::resume(
                    &self.data_dir,
                    router.clone(),
                    self.settings,
                    checkpoint,
                ) {
                    Ok(buffer) => {
                        tracing::info!(
                            partition,
                            resume_offset = next,
                            sealed_batches = buffer.sealed().len(),
                            "partition resumed from local checkpoint"
                        );
                        self.metrics
                            .partitions_resumed
                            .with_label_values(&["checkpoint"])
                            .inc();
                        (Some(buffer), seal_at)
                    }
                    Err(err) => {
                        tracing::warn!(partition, error = %err, "local checkpoint unusable, reading from the committed offset");
                        (None, intent.as_ref().map(|i| i.end))
                    }
                }
            }
            Recovery::FromCommitted { reason, seal_at } => {
                tracing::info!(partition, committed = ?committed, %reason, "partition starts from the committed offset");
                (None, seal_at)
            }
        };
        if let Some(end) = seal_at {
            self.metrics.emit(BatchReplayed {
                partition,
                start: intent.as_ref().map(|i| i.start),
                end,
            });
        }
        let mut buffer = match resumed {
            Some(buffer) => buffer,
            None => {
                self.metrics
                    .partitions_resumed
                    .with_label_values(&["committed"])
                    .inc();
                // Nothing committed: reading starts at the log's start as the assignment found it,
                // so records retention deletes before the first fetch are a gap (reported as
                // deleted), not a silent head start.
                let start = match committed {
                    Committed::Offset(offset) => Some(offset),
                    Committed::Nothing => log_start,
                };
                PartitionBuffer::fresh(
                    &self.data_dir,
                    &self.topic,
                    partition,
                    router,
                    self.settings,
                    start,
                )
                .map_err(io)?
            }
        };
        buffer.set_rules(&own_rules);
        match (seal_at, replay_rules, replay_hash) {
            (Some(_), Some(cut), Some(hash)) => {
                tracing::info!(partition, rules = %hash, "the replay cuts with the rules its intent names");
                let router = Router::with_code(
                    &cut.rules.routing,
                    cut.rules.routing_code,
                    &self.topic,
                    partition,
                )
                .with_suppression(cut.suppression.clone());
                let settings = BufferSettings {
                    max_file_bytes: cut.rules.max_file_bytes,
                    codec: cut.rules.compression,
                    ..self.settings
                };
                buffer.replay_with(router, settings, hash);
            }
            (Some(_), None, _) if own_rules != self.base_rules.1 => {
                // The intent names this member's rules without a list (`RulesSource`): the
                // replay leaves out no one its first attempt did not.
                let router = Router::new(&self.config.routing, &self.topic, partition);
                buffer.replay_with(router, self.settings, self.base_rules.1.clone());
            }
            _ => {}
        }
        buffer.set_seal_at(seal_at);
        if seal_at.is_some() {
            buffer.cut_as_planned(&planned_files);
        }
        buffer.set_log_start(log_start);
        // `None` (nothing known locally) lets the consumer start at the committed offset.
        let resume_from = buffer.next_offset();
        if let (Some(from), Some(log_start)) = (resume_from, log_start) {
            if from < log_start {
                // Kafka will skip to its log start (auto.offset.reset): say so, count it, and
                // let the batch's manifest record the lost range as a deleted gap.
                self.metrics.emit(RecordsDeletedBeforeArchived {
                    partition,
                    first_lost: from,
                    last_lost: log_start - 1,
                    replaying: seal_at.is_some(),
                });
            }
        }
        for batch in buffer.sealed() {
            // Sealed before a restart: its upload may have begun, under the intent the group
            // holds if it is this batch's (its files are that plan's: checked above).
            let continues_intent = intent
                .as_ref()
                .is_some_and(|i| (i.start, i.end) == (batch.start, batch.end));
            let _ = self.uploads.send(UploadJob {
                epoch,
                batch: batch.clone(),
                may_exist: true,
                plan: if continues_intent {
                    planned_files.clone()
                } else {
                    Vec::new()
                },
            });
        }
        // The group never committed the partition: where this member's archive of it starts is
        // committed before anything is read (see `Assigned::first_contact`).
        let first_contact = match committed {
            Committed::Nothing => buffer.first_offset(),
            Committed::Offset(_) => None,
        };
        self.hot_files += buffer.hot_files();
        let deleted_through_end = buffer.replay_tail().is_some_and(|(first, end)| {
            log_start.is_some_and(|start| start > end) && resume_from == Some(first)
        });
        if deleted_through_end {
            // Kafka kept none of the replay's records: no record will arrive to seal it.
            buffer.replay_log_passed_end();
        }
        self.partitions.insert(partition, (epoch, buffer));
        if deleted_through_end {
            self.seal(partition, SealTrigger::Replay)?;
        }
        self.refresh_disk_usage();
        Ok(Assigned {
            read_from: resume_from,
            first_contact,
        })
    }

    fn revoke(&mut self, partition: i32, keep_local: bool) -> Result<(), BufferError> {
        let Some((_, mut buffer)) = self.partitions.remove(&partition) else {
            return Ok(());
        };
        self.metrics
            .health
            .oldest_pending_ms
            .lock()
            .expect("lock")
            .remove(&partition);
        let io = |source| BufferError::Io { partition, source };
        self.hot_files -= buffer.hot_files();
        self.disk
            .replaying
            .lock()
            .expect("replaying lock")
            .remove(&partition);
        if keep_local {
            buffer.checkpoint().map_err(io)?;
        } else {
            buffer.discard().map_err(io)?;
        }
        self.refresh_disk_usage();
        Ok(())
    }

    /// Offsets `[first, last]` were skipped by the log between two records. Where the log start
    /// known so far does not already cover them, it is read again: a part below it was deleted
    /// while the member ran (retention passing a paused or slow partition, DeleteRecords) and is
    /// reported as such, with the rest recorded as holding no record.
    fn account_for_gap(
        log_starts: &LogStarts,
        metrics: &Metrics,
        partition: i32,
        buffer: &mut PartitionBuffer,
        first: i64,
        last: i64,
    ) {
        let known = buffer.log_start();
        if known.is_some_and(|start| start > last) {
            // Deleted as a whole, and reported when that start was learnt (the assignment).
            return;
        }
        if let Some(now) = log_starts(partition) {
            buffer.set_log_start(Some(known.map_or(now, |known| known.max(now))));
        }
        let reported_up_to = known.map_or(first, |start| start.clamp(first, last + 1));
        let deleted_up_to = buffer
            .log_start()
            .map_or(first, |start| start.clamp(first, last + 1));
        if deleted_up_to > reported_up_to {
            metrics.emit(RecordsDeletedBeforeArchived {
                partition,
                first_lost: reported_up_to,
                last_lost: deleted_up_to - 1,
                replaying: buffer.replaying(),
            });
        }
    }

    fn append(&mut self, partition: i32, records: &[Record]) -> Result<(), BufferError> {
        let io = |source| BufferError::Io { partition, source };
        if !self.partitions.contains_key(&partition) {
            // Revoked while these were in the channel: the new owner reads them again.
            return Ok(());
        }
        let (mut written, mut written_bytes) = (0, 0);
        let stage_limit = (self.staging_budget / self.reported_files.max(1))
            .clamp(MIN_STAGE_BYTES, MAX_STAGE_BYTES);
        if stage_limit < self.stage_limit_given / 4 * 3 {
            // Fitting every file costs a scan of them all, so only once the limit fell by a
            // quarter: the files then hold about a third more than the budget at most (one
            // command behind: the count of open files is taken after each).
            self.fit_staging(stage_limit)?;
        }
        self.stage_limit_given = self.stage_limit_given.max(stage_limit);
        let (list, rules) = self.own();
        if let Some((_, buffer)) = self.partitions.get_mut(&partition) {
            buffer.set_stage_limit(stage_limit);
            if buffer.rules() != rules && buffer.at_batch_boundary() {
                // A batch is cut with one list: a new one is taken up between batches.
                let router = Router::new(&self.config.routing, &self.topic, partition)
                    .with_suppression(list.clone());
                buffer.take_up(router, &rules);
                tracing::info!(partition, rules = %rules, ids = list.as_ref().map_or(0, |l| l.len()), "the partition's next batch is cut with the suppression list taken up");
            }
        }
        for record in records {
            self.tick += 1;
            let (_, buffer) = self.partitions.get_mut(&partition).expect("checked above");
            if buffer.replay_passed(record.offset) {
                if let Some((first, last)) = buffer.replay_tail() {
                    // What the seal records as the batch's last gap may have been deleted.
                    Self::account_for_gap(
                        &self.log_starts,
                        &self.metrics,
                        partition,
                        buffer,
                        first,
                        last,
                    );
                }
                self.seal(partition, SealTrigger::Replay)?;
            }
            let (_, buffer) = self.partitions.get_mut(&partition).expect("checked above");
            if let Some((first, last)) = buffer.gap_before(record.offset) {
                Self::account_for_gap(
                    &self.log_starts,
                    &self.metrics,
                    partition,
                    buffer,
                    first,
                    last,
                );
            }
            match buffer.append(record, self.tick).map_err(io)? {
                Some(appended) if appended.suppressed => self.metrics.records_suppressed.inc(),
                Some(appended) => {
                    written += 1;
                    written_bytes += appended.bytes;
                    if let Some(reason) = appended.dead_letter {
                        self.metrics
                            .records_dead_lettered
                            .with_label_values(&[reason.as_str()])
                            .inc();
                    }
                    if appended.heated {
                        self.hot_files += 1;
                    }
                }
                None => self.metrics.records_skipped_redelivered.inc(),
            }
            // The cap is checked after every record, so a batch ends at the same record
            // however the poll loop happened to group them.
            if buffer.replay_complete() {
                self.seal(partition, SealTrigger::Replay)?;
            } else if buffer.batch_full() {
                self.seal(partition, SealTrigger::BatchSize)?;
            } else if self.hot_files > self.max_hot_files {
                self.enforce_compressor_cap()?;
            }
        }
        self.metrics.records_written.inc_by(written);
        self.metrics.bytes_written.inc_by(written_bytes);
        let (_, buffer) = self.partitions.get(&partition).expect("checked above");
        // Worth shipping: a megabyte, or a quarter of a batch where batches are smaller.
        let worth_sealing = (1 << 20).min(self.config.buffer.max_batch_bytes / 4);
        if self.disk.get() >= self.config.buffer.max_disk_bytes / 2
            && buffer.open_bytes() >= worth_sealing
        {
            // Past half the disk budget: ship what this partition holds so uploads free space
            // before the poll loop has to pause.
            self.seal(partition, SealTrigger::DiskPressure)?;
        }
        self.refresh_disk_usage();
        Ok(())
    }

    /// Fits the staging of every partition's files to `stage_limit`.
    fn fit_staging(&mut self, stage_limit: usize) -> Result<(), BufferError> {
        for (&partition, (_, buffer)) in &mut self.partitions {
            buffer
                .fit_staging(stage_limit)
                .map_err(|source| BufferError::Io { partition, source })?;
        }
        self.stage_limit_given = stage_limit;
        Ok(())
    }

    /// Cools the least recently used files until this worker is an eighth below its compressor
    /// share. Finding them scans every open file, so they are cooled in bulk: with thousands of
    /// files and a few hundred compressors, one scan pays for many heats.
    fn enforce_compressor_cap(&mut self) -> Result<(), BufferError> {
        let target = self.max_hot_files - self.max_hot_files / 8;
        let mut hot: Vec<(u64, i32, usize)> = self
            .partitions
            .iter()
            .flat_map(|(&p, (_, b))| b.hot_file_ticks().map(move |(tick, i)| (tick, p, i)))
            .collect();
        self.hot_files = hot.len();
        if hot.len() <= target {
            return Ok(());
        }
        let excess = hot.len() - target;
        hot.select_nth_unstable(excess - 1);
        for &(_, partition, index) in &hot[..excess] {
            let (_, buffer) = self.partitions.get_mut(&partition).expect("just found");
            buffer
                .cool_file(index)
                .map_err(|source| BufferError::Io { partition, source })?;
            self.hot_files -= 1;
        }
        Ok(())
    }

    fn seal(&mut self, partition: i32, trigger: SealTrigger) -> Result<(), BufferError> {
        let Some((epoch, buffer)) = self.partitions.get_mut(&partition) else {
            return Ok(());
        };
        let hot_before = buffer.hot_files();
        let was_replaying = buffer.replaying();
        let plan = buffer.planned_files().to_vec();
        let started = std::time::Instant::now();
        let sealed = buffer
            .seal()
            .map_err(|source| BufferError::Io { partition, source })?;
        // A replay refuses to seal before its end and keeps its compressors.
        self.hot_files -= hot_before - buffer.hot_files();
        if let Some(batch) = sealed {
            self.metrics.emit(BatchSealed {
                partition,
                start: batch.start,
                end: batch.end,
                files: batch.files.len(),
                records: batch.records(),
                trigger,
                gaps: &batch.gaps,
                took: started.elapsed(),
            });
            let _ = self.uploads.send(UploadJob {
                epoch: *epoch,
                batch,
                // A replayed intent's objects may be up already, from the interrupted upload.
                may_exist: was_replaying,
                plan,
            });
        }
        Ok(())
    }

    fn checkpoint_all(&mut self) -> Result<(), BufferError> {
        for (&partition, (_, buffer)) in &mut self.partitions {
            buffer
                .checkpoint()
                .map_err(|source| BufferError::Io { partition, source })?;
        }
        self.refresh_disk_usage();
        Ok(())
    }

    /// Publishes this worker's disk bytes, open files and compressors as deltas of the shared
    /// figures, since every worker contributes to the same process-wide gauges.
    fn refresh_disk_usage(&mut self) {
        let bytes: u64 = self.partitions.values().map(|(_, b)| b.disk_bytes()).sum();
        let files: usize = self.partitions.values().map(|(_, b)| b.open_files()).sum();
        let previous = std::mem::replace(&mut self.disk_bytes, bytes);
        if bytes >= previous {
            self.disk
                .bytes
                .fetch_add(bytes - previous, Ordering::Relaxed);
        } else {
            self.disk
                .bytes
                .fetch_sub(previous - bytes, Ordering::Relaxed);
        }
        self.metrics.buffered_bytes.set(self.disk.get() as i64);
        let previous_files = std::mem::replace(&mut self.reported_files, files);
        self.metrics
            .open_files
            .add(files as i64 - previous_files as i64);
        let previous_hot = std::mem::replace(&mut self.reported_hot, self.hot_files);
        self.metrics
            .open_compressors
            .add(self.hot_files as i64 - previous_hot as i64);
        let mut oldest = self.metrics.health.oldest_pending_ms.lock().expect("lock");
        let mut replaying = self.disk.replaying.lock().expect("replaying lock");
        for (&partition, (_, buffer)) in &self.partitions {
            oldest.insert(partition, buffer.oldest_pending_ms());
            if buffer.replaying() {
                replaying.insert(partition);
            } else {
                replaying.remove(&partition);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::GapCause;
    use crate::layout::Destination;
    use std::collections::HashSet;
    use std::io::Read;
    use std::sync::mpsc::{sync_channel, SyncSender};

    fn record(offset: i64, source: i64, day: i64) -> Record {
        padded_record(offset, source, day, 3000)
    }

    fn padded_record(offset: i64, source: i64, day: i64, pad: usize) -> Record {
        let payload = format!(
            r#"{{"projectId":"s{source}","receivedAt":"2026-11-{day}T12:00:00Z","messageId":"m{offset}","pad":"{}"}}"#,
            "x".repeat(pad)
        );
        Record {
            offset,
            timestamp_ms: Some(0),
            key: None,
            payload: Some(payload.into_bytes()),
            headers: vec![],
        }
    }

    /// A sealed file's lines, as text.
    fn decoded(path: &std::path::Path) -> String {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    /// A worker on its own thread, over a fresh data directory, as the poll loop drives it.
    struct TestWorker {
        commands: SyncSender<WorkerCommand>,
        sealed: tokio::sync::mpsc::UnboundedReceiver<UploadJob>,
        metrics: Metrics,
        /// What the worker's `LogStarts` answers (`-1`: the broker does not answer).
        log_start: Arc<std::sync::atomic::AtomicI64>,
        /// The suppression list the worker cuts new batches with.
        suppression: Arc<CurrentList>,
        thread: std::thread::JoinHandle<Result<(), BufferError>>,
        _dir: tempfile::TempDir,
    }

    impl TestWorker {
        fn start(configure: impl FnOnce(&mut Config), disk: Arc<DiskUsage>) -> TestWorker {
            let dir = tempfile::tempdir().unwrap();
            let mut config = Config::default();
            config.buffer.data_dir = dir.path().to_path_buf();
            configure(&mut config);
            let (uploads, sealed) = tokio::sync::mpsc::unbounded_channel();
            let metrics = Metrics::new();
            let log_start = Arc::new(std::sync::atomic::AtomicI64::new(-1));
            let answer = Arc::clone(&log_start);
            let log_starts: LogStarts =
                Arc::new(move |_| Some(answer.load(Ordering::Relaxed)).filter(|start| *start >= 0));
            let worker = Worker::new(
                Arc::new(config),
                1,
                uploads,
                metrics.clone(),
                disk,
                Arc::clone(&log_starts),
            );
            let suppression = Arc::new(CurrentList::default());
            let worker = worker.with_suppression(Arc::clone(&suppression));
            let (commands, queue) = sync_channel(4);
            let thread =
                std::thread::spawn(move || worker.run(queue, &QueuedRecords::new(u64::MAX)));
            TestWorker {
                commands,
                sealed,
                metrics,
                log_start,
                suppression,
                thread,
                _dir: dir,
            }
        }

        fn seal_all(&self) {
            self.commands
                .send(WorkerCommand::SealAll {
                    trigger: SealTrigger::Schedule,
                })
                .unwrap();
            self.barrier();
        }

        /// Assigns `partition`; the offset the worker says to read from.
        fn assign(
            &self,
            partition: i32,
            committed: Committed,
            intent: Option<BatchIntent>,
            log_start: Option<i64>,
        ) -> Option<i64> {
            self.assigned(partition, committed, intent, log_start)
                .read_from
        }

        /// Assigns `partition`; the worker's whole answer.
        fn assigned(
            &self,
            partition: i32,
            committed: Committed,
            intent: Option<BatchIntent>,
            log_start: Option<i64>,
        ) -> Assigned {
            let (reply, answer) = sync_channel(1);
            self.commands
                .send(WorkerCommand::Assign {
                    partition,
                    epoch: 1,
                    committed,
                    intent,
                    log_start,
                    replay_rules: None,
                    planned_files: Vec::new(),
                    reply,
                })
                .unwrap();
            answer.recv().unwrap().unwrap()
        }

        fn records(&self, partition: i32, records: &[Record]) {
            for chunk in records.chunks(100) {
                self.commands
                    .send(WorkerCommand::Records {
                        partition,
                        records: chunk.to_vec(),
                    })
                    .unwrap();
            }
        }

        /// Waits until the worker handled everything sent before (a revoke of a partition it
        /// does not own answers once the commands queued ahead of it are done).
        fn barrier(&self) {
            let (reply, answer) = sync_channel(1);
            self.commands
                .send(WorkerCommand::Revoke {
                    partition: 999,
                    keep_local: true,
                    reply,
                })
                .unwrap();
            answer.recv().unwrap();
        }

        fn stop(self) {
            let (reply, answer) = sync_channel(1);
            self.commands.send(WorkerCommand::Stop { reply }).unwrap();
            answer.recv().unwrap();
            self.thread.join().unwrap().unwrap();
        }
    }

    /// Events of users `u0` (suppressed from offset 10's batch on) and `u1`.
    fn of_user(offset: i64) -> Record {
        let payload = format!(
            r#"{{"projectId":"s1","receivedAt":"2026-11-20T12:00:00Z","userId":"u{}","messageId":"m{offset}"}}"#,
            offset % 2
        );
        Record {
            payload: Some(payload.into_bytes()),
            ..record(offset, 1, 20)
        }
    }

    /// A worker's files hold about its share of the staging budget, however its partitions'
    /// records come: here one partition's lines are staged while it has the worker to itself,
    /// then another opens two hundred files. Every line still reaches its file, in order.
    #[test]
    fn a_workers_files_stay_within_its_staging_budget_as_other_partitions_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.buffer.data_dir = dir.path().to_path_buf();
        let (uploads, mut sealed) = tokio::sync::mpsc::unbounded_channel();
        let log_starts: LogStarts = Arc::new(|_| None);
        let mut worker = Worker::new(
            Arc::new(config),
            1,
            uploads,
            Metrics::new(),
            Arc::new(DiskUsage::default()),
            log_starts,
        );
        let budget = 256 << 10;
        worker.staging_budget = budget;
        for partition in [0, 1] {
            let (reply, answer) = sync_channel(1);
            worker
                .handle(WorkerCommand::Assign {
                    partition,
                    epoch: 1,
                    committed: Committed::Offset(0),
                    intent: None,
                    log_start: None,
                    replay_rules: None,
                    planned_files: Vec::new(),
                    reply,
                })
                .unwrap();
            answer.recv().unwrap().unwrap();
        }
        // Partition 0 alone: 32 files of 7 lines of 3 KB, all staged under the 64 KiB cap.
        let early: Vec<Record> = (0..224)
            .map(|n| padded_record(n, n % 32, 20, 3_000))
            .collect();
        worker
            .handle(WorkerCommand::Records {
                partition: 0,
                records: early.clone(),
            })
            .unwrap();
        // Partition 1 opens 200 files of small lines, a poll round's share at a time.
        let late: Vec<Record> = (0..400)
            .map(|n| padded_record(n, n % 200, 20, 300))
            .collect();
        for chunk in late.chunks(100) {
            worker
                .handle(WorkerCommand::Records {
                    partition: 1,
                    records: chunk.to_vec(),
                })
                .unwrap();
        }
        let staged: usize = worker
            .partitions
            .values()
            .map(|(_, buffer)| buffer.staging_bytes())
            .sum();
        assert!(
            staged <= budget / 3 * 4,
            "{staged} bytes staged for a budget of {budget}"
        );
        let hot: usize = worker.partitions.values().map(|(_, b)| b.hot_files()).sum();
        assert_eq!(
            worker.hot_files, hot,
            "fitting leaves the compressor count right"
        );
        // Every file still checkpoints (flushed to a byte boundary, its state read).
        worker.checkpoint_all().unwrap();

        worker
            .handle(WorkerCommand::SealAll {
                trigger: SealTrigger::Requested,
            })
            .unwrap();
        let mut jobs = [sealed.try_recv().unwrap(), sealed.try_recv().unwrap()];
        jobs.sort_by_key(|job| job.batch.partition);
        for (records, job) in [&early, &late].into_iter().zip(jobs) {
            let mut lines = Vec::new();
            for file in &job.batch.files {
                lines.extend(decoded(&file.path).lines().map(str::to_string));
            }
            let mut expected: Vec<String> = records
                .iter()
                .map(|r| String::from_utf8(r.payload.clone().unwrap()).unwrap())
                .collect();
            // Files are read one after another: compare the lines of each source in order.
            let source =
                |line: &String| line[14..line.find("\",\"receivedAt").unwrap()].to_string();
            expected.sort_by_key(source);
            lines.sort_by_key(source);
            assert_eq!(lines, expected);
        }
    }

    #[test]
    fn a_new_suppression_list_is_taken_up_from_the_next_batch_and_a_replay_cuts_as_its_first_attempt(
    ) {
        use crate::suppress::hash_id;
        let mut worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
        let base = CuttingRules::of(&Config::default());
        assert_eq!(worker.assign(0, Committed::Offset(0), None, None), Some(0));
        let records: Vec<Record> = (0..40).map(of_user).collect();
        worker.records(0, &records[..10]);
        worker.barrier();
        // The list comes while a batch is open: that batch is cut without it.
        let list = Arc::new(Suppression::new([hash_id("u0")]));
        worker.suppression.set(Arc::clone(&list));
        worker.records(0, &records[10..20]);
        worker.seal_all();
        let first = worker
            .sealed
            .try_recv()
            .expect("the batch open when the list came");
        assert_eq!((first.batch.start, first.batch.end), (0, 19));
        assert_eq!(
            (first.batch.records(), first.batch.rules.as_str()),
            (20, base.hash().as_str())
        );
        assert!(first.batch.gaps.is_empty());

        worker.records(0, &records[20..30]);
        worker.seal_all();
        let second = worker.sealed.try_recv().expect("the next batch");
        let with_list = base.clone().with_suppression(Some(&list));
        assert_eq!(second.batch.rules, with_list.hash());
        assert_eq!(second.batch.records(), 5, "u1's events");
        let suppressed: Vec<i64> = second
            .batch
            .gaps
            .iter()
            .inspect(|gap| assert_eq!(gap.cause, GapCause::Suppressed))
            .flat_map(|gap| gap.first..=gap.last)
            .collect();
        assert_eq!(suppressed, vec![20, 22, 24, 26, 28]);
        assert_eq!(worker.metrics.records_suppressed.get(), 5);
        worker.stop();

        // Replays on a member that has the list now: each cuts with the rules its intent names.
        let replay = |intent: BatchIntent, cut: Option<ReplayCut>| {
            let mut worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
            worker.suppression.set(Arc::clone(&list));
            let (reply, answer) = sync_channel(1);
            worker
                .commands
                .send(WorkerCommand::Assign {
                    partition: 0,
                    epoch: 1,
                    committed: Committed::Offset(intent.start),
                    intent: Some(intent.clone()),
                    log_start: None,
                    replay_rules: cut.map(Box::new),
                    planned_files: Vec::new(),
                    reply,
                })
                .unwrap();
            answer.recv().unwrap().unwrap();
            worker.records(0, &records[intent.start as usize..=intent.end as usize]);
            worker.barrier();
            let job = worker.sealed.try_recv().expect("the replayed batch");
            worker.stop();
            job.batch
        };
        let again = replay(
            BatchIntent::new(20, 29, with_list.hash()),
            Some(ReplayCut {
                rules: with_list.clone(),
                suppression: Some(Arc::clone(&list)),
            }),
        );
        assert_eq!((again.records(), &again.gaps), (5, &second.batch.gaps));
        let before_the_list = replay(BatchIntent::new(0, 19, base.hash()), None);
        assert_eq!(before_the_list.records(), 20, "cut as without a list");
        assert!(before_the_list.gaps.is_empty());
        assert_eq!(before_the_list.rules, base.hash());
    }

    /// A member's volume holds batch [0, 99] as the first attempt read it (an earlier volume,
    /// or a member that froze); meanwhile a replay found Kafka's log starting at 50 and may
    /// have put objects holding offsets 50.. only. The local copy is not continued; a local
    /// copy that holds nothing below 50 either (that replay's own) is.
    #[test]
    fn a_local_copy_with_lines_an_overtaken_replay_no_longer_had_is_not_uploaded() {
        let batch = |gaps: Vec<crate::checkpoint::Gap>| crate::checkpoint::BatchState {
            start: 0,
            end: 99,
            files: Vec::new(),
            first_read_ms: None,
            gaps,
            rules: String::new(),
        };
        let checkpoint = |batch: crate::checkpoint::BatchState, sealed: bool| {
            let mut checkpoint = crate::checkpoint::Checkpoint::new("t", 0, 100);
            if sealed {
                checkpoint.sealed.push(batch);
            } else {
                checkpoint.open = Some(batch);
            }
            checkpoint
        };
        let intent = |kept_from| BatchIntent {
            kept_from,
            ..BatchIntent::new(0, 99, "rules".into())
        };
        for sealed in [true, false] {
            let whole = checkpoint(batch(Vec::new()), sealed);
            assert_eq!(lines_below_kept(&whole, &intent(Some(50))), Some((0, 50)));
            assert_eq!(lines_below_kept(&whole, &intent(None)), None);
            let deleted = |last| crate::checkpoint::Gap {
                first: 0,
                last,
                cause: GapCause::Deleted,
            };
            let replays_own = checkpoint(batch(vec![deleted(49)]), sealed);
            assert_eq!(lines_below_kept(&replays_own, &intent(Some(50))), None);
            let an_earlier_replays = checkpoint(batch(vec![deleted(19)]), sealed);
            assert_eq!(
                lines_below_kept(&an_earlier_replays, &intent(Some(50))),
                Some((0, 50))
            );
            // Transaction markers at the log's start, then the deleted offsets: still no line.
            let markers_first = checkpoint(
                batch(vec![
                    crate::checkpoint::Gap {
                        first: 0,
                        last: 4,
                        cause: GapCause::NoRecord,
                    },
                    crate::checkpoint::Gap {
                        first: 5,
                        last: 49,
                        cause: GapCause::Deleted,
                    },
                ]),
                sealed,
            );
            assert_eq!(lines_below_kept(&markers_first, &intent(Some(50))), None);
        }
    }

    /// A member replays an interrupted batch while the volume is past half its budget (other
    /// partitions hold data that cannot be uploaded yet): the disk-pressure seal must not end
    /// the replay before its recorded end.
    #[test]
    fn a_local_batch_is_continued_only_under_the_rules_its_intent_names() {
        // Issue 19, finding 2: this member cut [0, 99] under its own rules and kept it on its
        // volume; meanwhile another member, on new rules, recorded the intent [0, 199] and put
        // some of its objects. Continuing the local batch would cut its head one way and its
        // tail the other.
        let mut worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
        assert_eq!(worker.assign(1, Committed::Offset(0), None, None), Some(0));
        let records: Vec<Record> = (0..200).map(|o| record(o, o % 3, 20)).collect();
        worker.records(1, &records[..100]);
        let (reply, answer) = sync_channel(1);
        let revoke = WorkerCommand::Revoke {
            partition: 1,
            keep_local: true,
            reply,
        };
        worker.commands.send(revoke).unwrap();
        answer.recv().unwrap();

        let theirs = BatchIntent::new(0, 199, "rules of the other member".into());
        let resume = worker.assign(1, Committed::Offset(0), Some(theirs), None);
        assert_eq!(
            resume,
            Some(0),
            "the replay reads the whole batch from Kafka"
        );
        worker.records(1, &records);
        worker.barrier();
        let job = worker.sealed.try_recv().expect("the replayed batch");
        assert_eq!(
            (job.batch.start, job.batch.end, job.batch.records()),
            (0, 199, 200)
        );
        worker.stop();
    }

    #[test]
    fn disk_pressure_never_cuts_a_replay_short() {
        let disk = Arc::new(DiskUsage::default());
        // What the other workers' partitions hold, waiting for S3: past half the budget.
        disk.bytes.store(40 << 20, Ordering::Relaxed);
        let mut worker = TestWorker::start(|c| c.buffer.max_disk_bytes = 64 << 20, disk);
        let intent = BatchIntent::new(0, 799, "rules".into());
        worker.assign(1, Committed::Offset(0), Some(intent), None);

        // Half the batch, over a megabyte uncompressed: enough for a disk-pressure seal.
        let records: Vec<Record> = (0..800).map(|o| record(o, o % 3, 20)).collect();
        worker.records(1, &records[..400]);
        worker.barrier();
        if let Ok(job) = worker.sealed.try_recv() {
            panic!(
                "replay of [0, 799] sealed early as [{}, {}] holding {} records",
                job.batch.start,
                job.batch.end,
                job.batch.records()
            );
        }
        worker.records(1, &records[400..]);
        worker.barrier();
        let job = worker
            .sealed
            .try_recv()
            .expect("the replayed batch, sealed at its end");
        assert_eq!(
            (job.batch.start, job.batch.end, job.batch.records()),
            (0, 799, 800)
        );
        worker.stop();
    }

    /// The group committed 0 but retention moved the log's start to 300 while the partition
    /// waited: the loss is counted at assignment and the sealed batch names it as a gap.
    #[test]
    fn records_deleted_before_they_were_read_are_counted_and_recorded() {
        let mut worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
        let intent = BatchIntent::new(0, 399, "rules".into());
        assert_eq!(
            worker.assign(0, Committed::Offset(0), Some(intent), Some(300)),
            Some(0)
        );
        assert_eq!(worker.metrics.offset_resets.get(), 1);
        // librdkafka resets to the log start: the replay reads 300..=399 and ends at 399.
        let records: Vec<Record> = (300..400).map(|o| record(o, o % 3, 20)).collect();
        worker.records(0, &records);
        worker.barrier();
        let job = worker.sealed.try_recv().expect("the replayed batch");
        assert_eq!(
            (job.batch.start, job.batch.end, job.batch.records()),
            (0, 399, 100)
        );
        assert_eq!(
            job.batch.gaps,
            vec![crate::checkpoint::Gap {
                first: 0,
                last: 299,
                cause: GapCause::Deleted
            }]
        );
        let deleted = worker
            .metrics
            .offsets_without_record
            .with_label_values(&["deleted"]);
        assert_eq!(deleted.get(), 300);
        worker.stop();
    }

    /// Retention passes a partition while the member runs (paused for the disk budget, or
    /// reading slower than the log is deleted) and librdkafka resets it to the log start: the
    /// jump is not taken for offsets without records. The worker reads the log start when the
    /// gap appears, reports the deleted part (log line, `archiver_offset_resets_total`) and
    /// records it as `deleted`; only the part above the log start is `no-record`.
    #[test]
    fn records_deleted_while_the_member_runs_are_reported_not_filed_as_no_record() {
        let mut worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
        // The assignment-time read of the log start failed, as it may.
        assert_eq!(worker.assign(0, Committed::Offset(0), None, None), Some(0));
        let before: Vec<Record> = (0..10).map(|o| record(o, o % 3, 20)).collect();
        worker.records(0, &before);
        // Offsets 10..=49 deleted; 50..=59 held transaction markers or compacted records.
        worker.log_start.store(50, Ordering::Relaxed);
        let after: Vec<Record> = (60..70).map(|o| record(o, o % 3, 20)).collect();
        worker.records(0, &after);
        worker
            .commands
            .send(WorkerCommand::SealAll {
                trigger: SealTrigger::Schedule,
            })
            .unwrap();
        worker.barrier();
        let job = worker.sealed.try_recv().expect("the sealed batch");
        assert_eq!(
            (job.batch.start, job.batch.end, job.batch.records()),
            (0, 69, 20)
        );
        assert_eq!(
            job.batch.gaps,
            vec![
                crate::checkpoint::Gap {
                    first: 10,
                    last: 49,
                    cause: GapCause::Deleted
                },
                crate::checkpoint::Gap {
                    first: 50,
                    last: 59,
                    cause: GapCause::NoRecord
                },
            ]
        );
        assert_eq!(worker.metrics.offset_resets.get(), 1);
        // A later gap above the log start (compaction) is no loss: nothing more is reported.
        worker.records(0, &[record(75, 0, 20)]);
        worker.barrier();
        assert_eq!(worker.metrics.offset_resets.get(), 1);
        worker.stop();
    }

    #[test]
    fn a_partition_the_group_never_committed_has_its_start_committed_at_first_contact() {
        // Issue 19: without it, a member taking the partition over on another volume starts at
        // the log's start as it is then, and what retention deleted in between (records the
        // first member had read, not yet archived) is lost without a report.
        let worker = TestWorker::start(|_| {}, Arc::new(DiskUsage::default()));
        let fresh = worker.assigned(0, Committed::Nothing, None, Some(40));
        assert_eq!((fresh.read_from, fresh.first_contact), (Some(40), Some(40)));
        // A partition with a commit already has its start on record: nothing more to commit.
        let committed = worker.assigned(1, Committed::Offset(7), None, Some(0));
        assert_eq!(
            (committed.read_from, committed.first_contact),
            (Some(7), None)
        );
        // Resumed from its volume: the local batch's start, not where reading goes on, or a
        // takeover would skip the records the batch holds.
        worker.records(0, &(40..60).map(|o| record(o, 0, 20)).collect::<Vec<_>>());
        worker.barrier();
        let revoke = |partition| {
            let (reply, answer) = sync_channel(1);
            worker
                .commands
                .send(WorkerCommand::Revoke {
                    partition,
                    keep_local: true,
                    reply,
                })
                .unwrap();
            answer.recv().unwrap();
        };
        revoke(0);
        let resumed = worker.assigned(0, Committed::Nothing, None, Some(45));
        assert_eq!(
            (resumed.read_from, resumed.first_contact),
            (Some(60), Some(40))
        );
        worker.stop();
    }

    #[test]
    fn hundreds_of_files_share_a_few_compressors_and_keep_every_line() {
        let mut worker = TestWorker::start(
            |c| c.buffer.max_open_compressors = 8,
            Arc::new(DiskUsage::default()),
        );
        worker.assign(0, Committed::Nothing, None, None);
        let metrics = worker.metrics.clone();

        // 150 sources x 2 days, interleaved record by record: 300 files of ~120 KB each, so
        // each compresses a few 64 KiB chunks, sharing 8 compressors.
        let records: Vec<Record> = (0..12_000)
            .map(|o| record(o, o % 150, 20 + (o / 150) % 2))
            .collect();
        let mut most_open = 0;
        for chunk in records.chunks(500) {
            worker
                .commands
                .send(WorkerCommand::Records {
                    partition: 0,
                    records: chunk.to_vec(),
                })
                .unwrap();
            worker.barrier();
            most_open = most_open.max(metrics.open_compressors.get());
            assert!(metrics.open_compressors.get() <= 8, "cap exceeded");
        }
        assert!(most_open > 0);
        assert_eq!(metrics.open_files.get(), 300);

        worker
            .commands
            .send(WorkerCommand::SealAll {
                trigger: SealTrigger::Requested,
            })
            .unwrap();
        worker.barrier();
        let job = worker.sealed.try_recv().expect("one sealed batch");
        assert_eq!((job.batch.start, job.batch.end), (0, 11_999));
        assert_eq!(job.batch.files.len(), 300);
        let mut seen = HashSet::new();
        for file in &job.batch.files {
            let text = decoded(&file.path);
            assert_eq!(text.lines().count() as u64, file.records, "{:?}", file.path);
            for line in text.lines() {
                let event: serde_json::Value = serde_json::from_str(line).unwrap();
                let Destination::Events { source, .. } = &file.destination else {
                    panic!("no dead letters here: {:?}", file.destination);
                };
                assert_eq!(event["projectId"], source.as_str());
                assert!(seen.insert(event["messageId"].as_str().unwrap().to_string()));
            }
        }
        assert_eq!(
            seen.len(),
            12_000,
            "every record once, cooled and reheated files included"
        );

        worker.stop();
    }
}
