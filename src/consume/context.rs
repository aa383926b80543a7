//! The consumer's context: the rebalance callbacks, which run inside `poll` on the poll thread.
//! They talk to the buffer workers and wait for their answer before the assignment changes (as
//! Quickwit's Kafka source does): an assigned partition starts where its local checkpoint, its
//! committed intent or the bucket says; a revoked one drops its in-flight batch before another
//! member can read it. Also librdkafka's logs, statistics and errors.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::committed::{self, CommittedEntry, CommittedOffsets};
use super::replay_rules::{ReplayRules, RulesSource};
use super::BROKER_TIMEOUT;
use crate::checkpoint::Committed;
use crate::commit::Assignments;
use crate::kafka_client::Auth;
use crate::metrics::events::PartitionHeld;
use crate::metrics::Metrics;
use crate::pipeline::{
    worker_for, Assigned, BatchIntent, BufferError, CommitRequest, Fatal, PlannedFile, ReplayCut,
    WorkerCommand,
};
use crate::upload::ArchiveEnd;

/// How long an assignment keeps asking for the committed offsets before the member gives up and
/// stops: well inside librdkafka's `max.poll.interval.ms` (5 minutes), long enough to ride out a
/// coordinator moving or loading.
const COMMITTED_PATIENCE: Duration = Duration::from_secs(60);

/// Lets the same message through once per interval: a broker that is down makes librdkafka
/// report the same error every few milliseconds.
#[derive(Debug, Default)]
struct LogThrottle {
    last: std::sync::Mutex<HashMap<String, Instant>>,
}

impl LogThrottle {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn allow(&self, message: &str) -> bool {
        let mut last = self.last.lock().expect("throttle lock");
        let now = Instant::now();
        match last.get(message) {
            Some(at) if now.duration_since(*at) < Self::INTERVAL => false,
            _ => {
                last.insert(message.to_string(), now);
                true
            }
        }
    }
}

/// State the rebalance callbacks need; lives inside the consumer.
pub struct ArchiverContext {
    topic: String,
    workers: Vec<SyncSender<WorkerCommand>>,
    assignments: Arc<Assignments>,
    metrics: Metrics,
    fatal: Arc<Fatal>,
    /// Where OAUTHBEARER tokens come from (`kafka.auth`).
    auth: Auth,
    /// Set once the workers stopped: revocations during close keep local files for a restart.
    shutting_down: AtomicBool,
    throttle: LogThrottle,
    /// The group's committed offset of each assigned partition, for the committed-lag metric.
    committed: std::sync::Mutex<HashMap<i32, i64>>,
    /// Where the bucket says a partition's archive ends (its newest manifest), for partitions the
    /// group never committed; `None` when `kafka.uncommitted_start = "reset"`.
    bucket_position: Option<BucketPosition>,
    /// Reads the intent the bucket keeps, with the files its batch was cut into, for a
    /// partition that replays one; `None` replays without them (cut by size again).
    kept_intents: Option<KeptIntents>,
    /// Checks an intent's cutting rules before its replay; `None` replays every intent with the
    /// member's own rules.
    rules_source: Option<RulesSource>,
    /// Partitions whose intent this member cannot replay (the reason is logged): assigned but
    /// paused, never read.
    held: std::sync::Mutex<std::collections::HashSet<i32>>,
    /// librdkafka's text of the last client error: rdkafka passes it here, just before `poll`
    /// returns the same error with its code only, and it names the offset that failed.
    last_error: std::sync::Mutex<Option<(rdkafka::types::RDKafkaErrorCode, String)>>,
    /// Where each assigned partition started reading: librdkafka knows no position before the
    /// first record, and a batch that cannot be read right after a restart is there.
    starts: std::sync::Mutex<HashMap<i32, i64>>,
    /// The poll loop's commit queue: a first contact the coordinator refused is retried there,
    /// in order with the intents that follow it (an intent supersedes it, never the reverse).
    commits: Sender<CommitRequest>,
    /// Partitions whose first contact the group has not taken yet: paused, never read, until a
    /// commit of theirs goes in (see [`ArchiverContext::commit_first_contacts`]).
    awaiting_first_contact: std::sync::Mutex<BTreeSet<i32>>,
}

/// Why a partition is not set up.
enum Hold {
    /// Held: assigned, paused, never read (reported and counted).
    Partition,
    /// The member stops (a fatal error was raised).
    Stop,
}

/// Looks up the last offset the bucket holds for a partition (blocking).
pub type BucketPosition = Box<dyn Fn(i32) -> Result<ArchiveEnd, String> + Send + Sync>;

/// Looks up the files a partition's intent says its batch was first cut into, as the bucket
/// keeps them (blocking; empty when it keeps none).
pub type KeptIntents =
    Box<dyn Fn(i32, &BatchIntent) -> Result<Vec<PlannedFile>, String> + Send + Sync>;

impl ArchiverContext {
    pub fn new(
        topic: String,
        workers: Vec<SyncSender<WorkerCommand>>,
        commits: Sender<CommitRequest>,
        assignments: Arc<Assignments>,
        metrics: Metrics,
        fatal: Arc<Fatal>,
    ) -> ArchiverContext {
        ArchiverContext {
            topic,
            workers,
            assignments,
            metrics,
            fatal,
            auth: Auth::default(),
            shutting_down: AtomicBool::new(false),
            throttle: LogThrottle::default(),
            committed: std::sync::Mutex::new(HashMap::new()),
            bucket_position: None,
            kept_intents: None,
            rules_source: None,
            held: std::sync::Mutex::default(),
            last_error: std::sync::Mutex::default(),
            starts: std::sync::Mutex::default(),
            commits,
            awaiting_first_contact: std::sync::Mutex::default(),
        }
    }

    /// From now on (the workers stopped, the consumer closing) a revocation keeps local files:
    /// they are resumed by the next run on this volume, or discarded then if another member
    /// moved on.
    pub(super) fn keep_local_files_on_revoke(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether `message` may be logged now (see [`LogThrottle`]).
    pub(super) fn log_allowed(&self, message: &str) -> bool {
        self.throttle.allow(message)
    }

    /// librdkafka's text for the error `poll` just returned with `code`, if it gave one.
    pub(super) fn take_error_text(&self, code: rdkafka::types::RDKafkaErrorCode) -> Option<String> {
        let mut last = self.last_error.lock().expect("last error lock");
        match last.take() {
            Some((last_code, text)) if last_code == code => Some(text),
            _ => None,
        }
    }

    /// The offset `partition` started reading at when it was assigned, if known.
    pub(super) fn start_offset(&self, partition: i32) -> Option<i64> {
        self.starts
            .lock()
            .expect("starts lock")
            .get(&partition)
            .copied()
    }

    /// The group committed `next_offset` for `partition` (for the committed-lag metric). Answers
    /// whether the partition was waiting for its first contact to go in: the group now holds
    /// where its archive starts (that commit or an intent after it), so it is to be resumed.
    pub fn note_committed(&self, partition: i32, next_offset: i64) -> bool {
        self.committed
            .lock()
            .expect("lock")
            .insert(partition, next_offset);
        let waited = self
            .awaiting_first_contact
            .lock()
            .expect("awaiting lock")
            .remove(&partition);
        if waited {
            tracing::info!(
                partition,
                committed = next_offset,
                "the group holds where this member's archive of the partition starts: reading it"
            );
        }
        waited
    }

    /// Whether `partition` is paused until the group takes its first contact.
    pub fn awaits_first_contact(&self, partition: i32) -> bool {
        self.awaiting_first_contact
            .lock()
            .expect("awaiting lock")
            .contains(&partition)
    }

    /// Tokens for a broker that asks for them (`kafka.auth`).
    pub fn with_auth(mut self, auth: Auth) -> ArchiverContext {
        self.auth = auth;
        self
    }

    /// Intents cut under other rules are replayed with those rules, or held.
    pub fn with_rules_source(mut self, source: RulesSource) -> ArchiverContext {
        self.rules_source = Some(source);
        self
    }

    /// Partitions held this assignment, to pause once it is applied.
    fn held_partitions(&self) -> Vec<i32> {
        self.held
            .lock()
            .expect("held lock")
            .iter()
            .copied()
            .collect()
    }

    /// The rules `intent`'s replay cuts with (`None`: the member's own); `Err` when the
    /// partition is held or the member must stop, both already reported.
    fn replay_rules_for(
        &self,
        partition: i32,
        intent: Option<&BatchIntent>,
    ) -> Result<Option<Box<ReplayCut>>, Hold> {
        let (Some(intent), Some(source)) = (intent, &self.rules_source) else {
            return Ok(None);
        };
        match source.resolve(intent, COMMITTED_PATIENCE, Instant::now, std::thread::sleep) {
            Ok(ReplayRules::Own) => Ok(None),
            Ok(ReplayRules::Theirs(rules, suppression)) => {
                Ok(Some(Box::new(ReplayCut { rules, suppression })))
            }
            Ok(ReplayRules::Hold(reason)) => {
                let mut held = self.held.lock().expect("held lock");
                held.insert(partition);
                self.metrics.emit(PartitionHeld {
                    partition,
                    start: intent.start,
                    end: intent.end,
                    reason: &reason,
                    held: held.len(),
                });
                Err(Hold::Partition)
            }
            Err(err) => {
                self.fatal.raise(format!(
                    "cannot read the cutting rules of partition {partition}'s interrupted batch: \
                     {err}; stopping rather than replaying it with other rules"
                ));
                Err(Hold::Stop)
            }
        }
    }

    /// Partitions the group never committed start after what the bucket holds.
    pub fn with_bucket_position(mut self, lookup: BucketPosition) -> ArchiverContext {
        self.bucket_position = Some(lookup);
        self
    }

    /// Replays cut where their first upload did, as the bucket keeps it.
    pub fn with_kept_intents(mut self, lookup: KeptIntents) -> ArchiverContext {
        self.kept_intents = Some(lookup);
        self
    }

    /// The files `intent`'s first upload cut, as the bucket keeps them (the plan it names);
    /// empty when it keeps none (an earlier release's intent, kept for another).
    fn planned_files(
        &self,
        partition: i32,
        intent: &BatchIntent,
    ) -> Result<Vec<PlannedFile>, String> {
        let Some(lookup) = &self.kept_intents else {
            return Ok(Vec::new());
        };
        committed::fetch_until_known(
            "the plan the intent names",
            COMMITTED_PATIENCE,
            Instant::now,
            std::thread::sleep,
            || lookup(partition, intent),
        )
    }

    fn worker(&self, partition: i32) -> &SyncSender<WorkerCommand> {
        worker_for(&self.workers, partition)
    }

    /// Sets up each newly assigned partition and writes the offset to start from into `tpl`.
    /// Answers the first contacts to commit once the assignment is applied.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> Vec<(i32, i64)> {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() || self.shutting_down.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut replies = Vec::new();
        for (partition, command, answer) in self.assignment_commands(consumer, &partitions) {
            if self.worker(partition).send(command).is_err() {
                self.fatal.raise("buffer worker stopped".into());
                return Vec::new();
            }
            replies.push((partition, answer));
        }
        let mut first_contacts = Vec::new();
        for (partition, answer) in replies {
            match answer.recv() {
                Ok(Ok(assigned)) => {
                    if let Some(offset) = assigned.read_from {
                        let _ = tpl.set_partition_offset(
                            &self.topic,
                            partition,
                            Offset::Offset(offset),
                        );
                        self.note_start(partition, offset);
                    }
                    if let Some(offset) = assigned.first_contact {
                        first_contacts.push((partition, offset));
                    }
                }
                Ok(Err(err)) => self.fatal.raise(err.to_string()),
                Err(_) => self.fatal.raise("buffer worker stopped".into()),
            }
        }
        self.metrics
            .assigned_partitions
            .set(self.assignments.partitions().len() as i64);
        tracing::info!(partitions = ?partitions, "partitions assigned");
        first_contacts
    }

    /// Commits where this member's archive of each partition the group never committed starts
    /// (`Assigned::first_contact`), before any record of it is read: without it, a member that
    /// takes the partition over on another volume would start at the log's start as it is then,
    /// and lose, unreported, what retention deleted of what this member had read. One round
    /// trip for all of them. A refused commit (a rebalance still in progress, the coordinator
    /// moving) goes to the poll loop's commit queue, retried with backoff, and its partitions
    /// are answered: the caller pauses them, and they are read only once the group holds a
    /// commit of theirs ([`ArchiverContext::note_committed`]).
    pub fn commit_first_contacts(
        &self,
        client: &impl GroupClient,
        first_contacts: &[(i32, i64)],
    ) -> Vec<i32> {
        if first_contacts.is_empty() {
            return Vec::new();
        }
        let error = match client.commit_positions(&self.topic, first_contacts) {
            Ok(()) => {
                tracing::info!(
                    positions = ?first_contacts,
                    "the group had no commit for these partitions: committed where this member's archive of each starts"
                );
                self.committed
                    .lock()
                    .expect("lock")
                    .extend(first_contacts.iter().copied());
                return Vec::new();
            }
            Err(error) => error,
        };
        tracing::warn!(
            positions = ?first_contacts,
            %error,
            "cannot commit yet where this member's archive of these partitions starts: they stay paused, not read, and the commit is retried"
        );
        let mut waiting = Vec::new();
        let mut awaiting = self.awaiting_first_contact.lock().expect("awaiting lock");
        for &(partition, offset) in first_contacts {
            let Some(epoch) = self.assignments.epoch(partition) else {
                continue;
            };
            let request = CommitRequest {
                partition,
                epoch,
                next_offset: offset,
                metadata: String::new(),
                reply: None,
            };
            if self.commits.send(request).is_err() {
                self.fatal.raise("the commit queue is closed".into());
                return Vec::new();
            }
            awaiting.insert(partition);
            waiting.push(partition);
        }
        waiting
    }

    /// Where each newly assigned partition stands (its commit and intent, the bucket, the rules
    /// of its replay, the log's start), as the `Assign` commands for its worker, each with the
    /// channel its answer comes back on: the offset to read from, or `None` for the committed
    /// one. A partition that is held gets no command; empty when the member must stop (the
    /// cause is raised as fatal).
    pub fn assignment_commands(
        &self,
        client: &impl GroupClient,
        partitions: &[i32],
    ) -> Vec<(i32, WorkerCommand, AssignAnswer)> {
        let mut committed = match self.fetch_committed(client, partitions) {
            Ok(committed) => committed,
            Err(err) => {
                self.fatal.raise(format!(
                    "cannot read the group's committed offsets of partitions {partitions:?}: {err}; \
                     stopping rather than planning their recovery on a guess"
                ));
                return Vec::new();
            }
        };
        if let Err(err) = self.start_uncommitted_after_the_bucket(partitions, &mut committed) {
            self.fatal.raise(format!(
                "cannot read where the bucket's archive ends for partitions without a commit: \
                 {err}; stopping rather than archiving their retained log a second time"
            ));
            return Vec::new();
        }
        let mut commands = Vec::new();
        for &partition in partitions {
            let (committed, intent) = committed
                .remove(&partition)
                .expect("read_committed answers for every partition asked");
            let replay_rules = match self.replay_rules_for(partition, intent.as_ref()) {
                Ok(rules) => rules,
                Err(Hold::Partition) => continue,
                Err(Hold::Stop) => return Vec::new(),
            };
            let planned_files = match intent.as_ref().map(|i| self.planned_files(partition, i)) {
                None => Vec::new(),
                Some(Ok(files)) => files,
                Some(Err(err)) => {
                    self.fatal.raise(format!(
                        "cannot read the files partition {partition}'s interrupted batch was cut \
                         into: {err}; stopping rather than cutting its replay elsewhere"
                    ));
                    return Vec::new();
                }
            };
            let epoch = self.assignments.assign(partition);
            let (reply, answer) = sync_channel(1);
            if let Committed::Offset(offset) = committed {
                self.committed
                    .lock()
                    .expect("lock")
                    .insert(partition, offset);
                self.note_start(partition, offset);
            }
            let log_start = match client.log_start(&self.topic, partition) {
                Ok(log_start) => log_start,
                Err(error) => {
                    tracing::warn!(partition, %error, "cannot read the log's first offset");
                    None
                }
            };
            let command = WorkerCommand::Assign {
                partition,
                epoch,
                committed,
                intent,
                log_start,
                replay_rules,
                planned_files,
                reply,
            };
            commands.push((partition, command, answer));
        }
        commands
    }

    /// Where a partition's reading starts, until librdkafka knows a position of its own.
    pub fn note_start(&self, partition: i32, offset: i64) {
        self.starts
            .lock()
            .expect("starts lock")
            .insert(partition, offset);
    }

    fn on_revoke(&self, tpl: &TopicPartitionList) {
        let keep_local = self.shutting_down.load(Ordering::SeqCst);
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut replies = Vec::new();
        for &partition in &partitions {
            self.assignments.revoke(partition);
            {
                let mut held = self.held.lock().expect("held lock");
                held.remove(&partition);
                self.metrics.partitions_held.set(held.len() as i64);
            }
            self.committed.lock().expect("lock").remove(&partition);
            self.starts.lock().expect("starts lock").remove(&partition);
            self.awaiting_first_contact
                .lock()
                .expect("awaiting lock")
                .remove(&partition);
            self.metrics.forget_partition(partition);
            if keep_local {
                continue;
            }
            let (reply, answer) = sync_channel(1);
            let command = WorkerCommand::Revoke {
                partition,
                keep_local,
                reply,
            };
            if self.worker(partition).send(command).is_ok() {
                replies.push(answer);
            }
        }
        for answer in replies {
            let _ = answer.recv();
        }
        self.metrics
            .assigned_partitions
            .set(self.assignments.partitions().len() as i64);
        tracing::info!(partitions = ?partitions, "partitions revoked");
    }

    /// A partition without a commit (a new `group.id`, offsets expired) whose batches the bucket
    /// already holds resumes after its newest manifest instead of the log's start, or replays
    /// the interrupted batch whose intent the bucket keeps.
    fn start_uncommitted_after_the_bucket(
        &self,
        partitions: &[i32],
        committed: &mut CommittedOffsets,
    ) -> Result<(), String> {
        let Some(lookup) = &self.bucket_position else {
            return Ok(());
        };
        for &partition in partitions {
            if !matches!(committed.get(&partition), Some((Committed::Nothing, _))) {
                continue;
            }
            let end = committed::fetch_until_known(
                "where the bucket's archive ends",
                COMMITTED_PATIENCE,
                Instant::now,
                std::thread::sleep,
                || lookup(partition),
            )?;
            if let Some(intent) = end.interrupted {
                tracing::info!(
                    partition,
                    start = intent.start,
                    end = intent.end,
                    "the group has no commit for this partition: replaying the interrupted batch whose intent the bucket keeps"
                );
                committed.insert(partition, (Committed::Offset(intent.start), Some(intent)));
            } else if let Some(end) = end.manifest_end {
                tracing::info!(
                    partition,
                    manifest_end = end,
                    "the group has no commit for this partition: resuming after the newest manifest in the bucket"
                );
                committed.insert(partition, (Committed::Offset(end + 1), None));
            }
        }
        Ok(())
    }

    /// The group's committed offset and intent of every partition, asked again until the broker
    /// answered for each one.
    fn fetch_committed(
        &self,
        client: &impl GroupClient,
        partitions: &[i32],
    ) -> Result<CommittedOffsets, String> {
        committed::fetch_until_known(
            "the committed offsets",
            COMMITTED_PATIENCE,
            Instant::now,
            std::thread::sleep,
            || {
                let entries = client.committed_entries(&self.topic, partitions)?;
                committed::read_committed(partitions, entries)
            },
        )
    }
}

/// The answer to an `Assign` command (see [`Assigned`]).
pub type AssignAnswer = Receiver<Result<Assigned, BufferError>>;

/// What setting up an assignment asks of the group: librdkafka's consumer in production, the
/// simulation's group (`tests/simulation.rs`) in its runs.
pub trait GroupClient {
    /// The group's committed offset and metadata of each partition, as the coordinator answers
    /// now (one round trip: the caller asks again while a partition has no answer).
    fn committed_entries(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<CommittedEntry>, String>;

    /// The partition's first offset in the log now (`None` when the broker names none): a hint,
    /// without which a deleted range is still recorded as a gap, only not known as deleted.
    fn log_start(&self, topic: &str, partition: i32) -> Result<Option<i64>, String>;

    /// Commits each `(partition, offset)` as that partition's position, without metadata (no
    /// intent), in one request, and waits for the coordinator's answer.
    fn commit_positions(&self, topic: &str, positions: &[(i32, i64)]) -> Result<(), String>;
}

impl<C: ConsumerContext> GroupClient for BaseConsumer<C> {
    fn committed_entries(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<CommittedEntry>, String> {
        let mut tpl = TopicPartitionList::new();
        for &partition in partitions {
            tpl.add_partition(topic, partition);
        }
        let list = self
            .committed_offsets(tpl, BROKER_TIMEOUT)
            .map_err(|err| err.to_string())?;
        Ok(list
            .elements_for_topic(topic)
            .into_iter()
            .map(|e| CommittedEntry {
                partition: e.partition(),
                offset: match e.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                },
                metadata: e.metadata().to_string(),
                error: e.error().err().map(|err| err.to_string()),
            })
            .collect())
    }

    fn log_start(&self, topic: &str, partition: i32) -> Result<Option<i64>, String> {
        match self.fetch_watermarks(topic, partition, BROKER_TIMEOUT) {
            Ok((low, _)) if low >= 0 => Ok(Some(low)),
            Ok(_) => Ok(None),
            Err(err) => Err(err.to_string()),
        }
    }

    fn commit_positions(&self, topic: &str, positions: &[(i32, i64)]) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for &(partition, offset) in positions {
            tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(|err| err.to_string())?;
        }
        self.commit(&tpl, CommitMode::Sync)
            .map_err(|err| err.to_string())
    }
}

impl ClientContext for ArchiverContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    /// A fresh token for the broker (`kafka.auth = "aws-msk-iam"`); librdkafka asks before the
    /// current one expires.
    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.token()
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.auth.log(level, fac, message);
    }

    /// librdkafka's statistics (every few seconds): per-partition lag for the metrics.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if statistics
            .brokers
            .values()
            .any(|broker| broker.state == "UP")
        {
            self.metrics
                .health
                .brokers_down_since_ms
                .store(0, Ordering::Relaxed);
        }
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let assigned = self.assignments.partitions();
        for (&partition, stats) in &topic.partitions {
            if !assigned.contains(&partition) {
                continue;
            }
            let label = partition.to_string();
            if stats.hi_offset >= 0 && stats.app_offset >= 0 {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&label])
                    .set((stats.hi_offset - stats.app_offset).max(0));
            }
            let committed = self
                .committed
                .lock()
                .expect("lock")
                .get(&partition)
                .copied();
            if let (true, Some(committed)) = (stats.hi_offset >= 0, committed) {
                self.metrics
                    .committed_lag
                    .with_label_values(&[&label])
                    .set((stats.hi_offset - committed).max(0));
            }
            if stats.hi_offset >= 0 {
                self.metrics
                    .high_watermark
                    .with_label_values(&[&label])
                    .set(stats.hi_offset);
            }
            if let (true, Some(committed)) = (stats.lo_offset >= 0, committed) {
                self.metrics
                    .retention_headroom
                    .with_label_values(&[&label])
                    .set(committed - stats.lo_offset);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.auth.redact(reason);
        let reason = reason.as_str();
        if let Some(code) = error.rdkafka_error_code() {
            *self.last_error.lock().expect("last error lock") = Some((code, reason.to_string()));
        }
        if matches!(
            error,
            KafkaError::Global(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            let _ = self.metrics.health.brokers_down_since_ms.compare_exchange(
                0,
                chrono::Utc::now().timestamp_millis(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if self.throttle.allow(&error.to_string()) {
            tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error (repeats within 10s not logged)");
        }
    }
}

impl ConsumerContext for ArchiverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let first_contacts = self.on_assign(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                let awaiting = match result {
                    // Before `poll` returns, so before any record of these partitions is read.
                    Ok(()) => self.commit_first_contacts(consumer, &first_contacts),
                    Err(err) => {
                        self.fatal
                            .raise(format!("cannot apply partition assignment: {err}"));
                        Vec::new()
                    }
                };
                // librdkafka keeps a partition's pause across its revocation: one paused for the
                // disk budget, revoked and assigned back would never be read again (seen in the
                // chaos test). Whatever is assigned starts unpaused; backpressure pauses it anew.
                if let Err(err) = consumer.resume(tpl) {
                    tracing::warn!(error = %err, "cannot resume the newly assigned partitions");
                }
                // Held partitions, and those whose start the group does not hold yet, are not
                // read (pausing also drops what librdkafka fetched of them meanwhile).
                let not_read: Vec<i32> =
                    self.held_partitions().into_iter().chain(awaiting).collect();
                if !not_read.is_empty() {
                    let mut list = TopicPartitionList::new();
                    for partition in not_read {
                        list.add_partition(&self.topic, partition);
                    }
                    if let Err(err) = consumer.pause(&list) {
                        self.fatal
                            .raise(format!("cannot pause the partitions not to be read: {err}"));
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                self.on_revoke(tpl);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = result {
                    tracing::warn!(error = %err, "cannot apply partition revocation");
                }
            }
            other => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::warn!(error = ?other, "rebalance error; dropping the assignment");
                let all = consumer.assignment().unwrap_or_default();
                self.on_revoke(&all);
                let _ = consumer.unassign();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator that answers every commit with `refusal`, if any.
    struct Coordinator {
        refusal: Option<&'static str>,
        committed: std::cell::RefCell<Vec<(i32, i64)>>,
    }

    impl GroupClient for Coordinator {
        fn committed_entries(&self, _: &str, _: &[i32]) -> Result<Vec<CommittedEntry>, String> {
            unreachable!("not asked in these tests")
        }

        fn log_start(&self, _: &str, _: i32) -> Result<Option<i64>, String> {
            unreachable!("not asked in these tests")
        }

        fn commit_positions(&self, _: &str, positions: &[(i32, i64)]) -> Result<(), String> {
            match self.refusal {
                Some(refusal) => Err(refusal.into()),
                None => {
                    self.committed.borrow_mut().extend_from_slice(positions);
                    Ok(())
                }
            }
        }
    }

    fn context_with_queue() -> (ArchiverContext, Receiver<CommitRequest>) {
        let (worker, _) = sync_channel(1);
        let (commits, queue) = std::sync::mpsc::channel();
        let context = ArchiverContext::new(
            "events".into(),
            vec![worker],
            commits,
            Arc::new(Assignments::default()),
            Metrics::new(),
            Arc::new(Fatal::default()),
        );
        (context, queue)
    }

    #[test]
    fn a_first_contact_the_coordinator_takes_leaves_the_partition_readable() {
        let (context, queue) = context_with_queue();
        context.assignments.assign(3);
        let coordinator = Coordinator {
            refusal: None,
            committed: Default::default(),
        };
        assert!(context
            .commit_first_contacts(&coordinator, &[(3, 40)])
            .is_empty());
        assert_eq!(coordinator.committed.into_inner(), vec![(3, 40)]);
        assert!(!context.awaits_first_contact(3));
        assert!(queue.try_recv().is_err(), "nothing left to retry");
    }

    #[test]
    fn a_refused_first_contact_keeps_its_partition_unread_until_a_commit_of_it_goes_in() {
        let (context, queue) = context_with_queue();
        let epoch = context.assignments.assign(3);
        context.assignments.assign(5);
        let coordinator = Coordinator {
            refusal: Some("Broker: Group rebalance in progress"),
            committed: Default::default(),
        };
        let paused = context.commit_first_contacts(&coordinator, &[(3, 40), (5, 0)]);
        assert_eq!(paused, vec![3, 5], "the caller pauses both");
        assert!(context.awaits_first_contact(3) && context.awaits_first_contact(5));
        // Retried through the poll loop's commit queue, as a position without an intent, under
        // the assignment's epoch (a revocation meanwhile makes it stale).
        let retry = queue.try_recv().expect("partition 3's retry");
        assert_eq!(
            (
                retry.partition,
                retry.epoch,
                retry.next_offset,
                retry.metadata.as_str()
            ),
            (3, epoch, 40, "")
        );
        assert!(retry.reply.is_none());
        assert_eq!(queue.try_recv().expect("partition 5's retry").partition, 5);
        // Any commit of the partition (the retry, or an intent that superseded it) resumes it.
        assert!(context.note_committed(3, 40), "resume partition 3");
        assert!(!context.awaits_first_contact(3));
        assert!(!context.note_committed(3, 57), "already readable");
        assert!(context.awaits_first_contact(5), "partition 5 still waits");
    }
}
