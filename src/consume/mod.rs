//! Consume: the Kafka side. A blocking rdkafka poll loop on its own thread reads records and
//! hands them to the buffer workers over bounded channels; it also fires the seal schedule and
//! checkpoints, pauses partitions when the local disk budget is used up, and commits the offsets
//! the uploader reports as safely in S3.
//!
//! Rebalance callbacks run inside `poll` on this thread. They talk to the buffer workers and wait
//! for their answer before the assignment changes (as Quickwit's Kafka source does): an assigned
//! partition starts where its local checkpoint or committed offset says, a revoked one drops its
//! in-flight batch before another member can read it. The loop never waits on S3.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::buffer::DiskUsage;
use crate::checkpoint::Committed;
use crate::commit::{Assignments, CommitOutcome, PendingCommits};
use crate::config::Config;
use crate::config::ExactlyOnce;
use crate::metrics::Metrics;
use crate::pipeline::{worker_for, BatchIntent, CommitRequest, Record, SealTrigger, WorkerCommand};
use crate::schedule::{Clock, Schedule, UploadNow};
use backpressure::Backpressure;
use committed::{CommittedEntry, CommittedOffsets};
use replay_rules::{ReplayRules, RulesSource};

pub mod backpressure;
pub mod committed;
pub mod lag;
pub mod replay_rules;

/// Records handed to the workers per poll round, at most.
const MAX_RECORDS_PER_ROUND: usize = 1000;
/// How long one poll waits for a record when the topic is idle.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Broker round trips in rebalance callbacks.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an assignment keeps asking for the committed offsets before the member gives up and
/// stops: well inside librdkafka's `max.poll.interval.ms` (5 minutes), long enough to ride out a
/// coordinator moving or loading.
const COMMITTED_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The message is redacted: librdkafka quotes rejected property values, secrets included.
    #[error("cannot create the kafka consumer: {0}")]
    Create(String),
    #[error("cannot subscribe to topic {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("{0}")]
    Fatal(String),
}

/// A fatal condition raised by any thread; stops the process without the graceful path.
#[derive(Debug, Default)]
pub struct Fatal {
    message: std::sync::Mutex<Option<String>>,
}

impl Fatal {
    pub fn raise(&self, message: String) {
        let mut slot = self.message.lock().expect("fatal lock");
        if slot.is_none() {
            tracing::error!(error = %message, "stopping");
            *slot = Some(message);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.message.lock().expect("fatal lock").clone()
    }
}

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
    /// Set once the workers stopped: revocations during close keep local files for a restart.
    shutting_down: AtomicBool,
    throttle: LogThrottle,
    /// The group's committed offset of each assigned partition, for the committed-lag metric.
    committed: std::sync::Mutex<HashMap<i32, i64>>,
    /// Where the bucket says a partition's archive ends (its newest manifest), for partitions the
    /// group never committed; `None` when `kafka.uncommitted_start = "reset"`.
    bucket_position: Option<BucketPosition>,
    /// Checks an intent's cutting rules before its replay; `None` replays every intent with the
    /// member's own rules.
    rules_source: Option<RulesSource>,
    /// Partitions whose intent this member cannot replay (the reason is logged): assigned but
    /// paused, never read.
    held: std::sync::Mutex<std::collections::HashSet<i32>>,
}

/// Why a partition is not set up.
enum Hold {
    /// Held: assigned, paused, never read (reported and counted).
    Partition,
    /// The member stops (a fatal error was raised).
    Stop,
}

/// Looks up the last offset the bucket holds for a partition (blocking).
pub type BucketPosition = Box<dyn Fn(i32) -> Result<Option<i64>, String> + Send + Sync>;

impl ArchiverContext {
    pub fn new(
        topic: String,
        workers: Vec<SyncSender<WorkerCommand>>,
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
            shutting_down: AtomicBool::new(false),
            throttle: LogThrottle::default(),
            committed: std::sync::Mutex::new(HashMap::new()),
            bucket_position: None,
            rules_source: None,
            held: std::sync::Mutex::default(),
        }
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
    ) -> Result<Option<Box<crate::rules::CuttingRules>>, Hold> {
        let (Some(intent), Some(source)) = (intent, &self.rules_source) else {
            return Ok(None);
        };
        match source.resolve(intent, COMMITTED_PATIENCE, Instant::now, std::thread::sleep) {
            Ok(ReplayRules::Own) => Ok(None),
            Ok(ReplayRules::Theirs(rules)) => Ok(Some(Box::new(rules))),
            Ok(ReplayRules::Hold(reason)) => {
                tracing::error!(
                    partition,
                    start = intent.start,
                    end = intent.end,
                    %reason,
                    "holding the partition: its interrupted batch cannot be replayed by this member"
                );
                let mut held = self.held.lock().expect("held lock");
                held.insert(partition);
                self.metrics.partitions_held.set(held.len() as i64);
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

    fn worker(&self, partition: i32) -> &SyncSender<WorkerCommand> {
        worker_for(&self.workers, partition)
    }

    /// Sets up each newly assigned partition and writes the offset to start from into `tpl`.
    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() || self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let mut committed = match self.fetch_committed(consumer, tpl, &partitions) {
            Ok(committed) => committed,
            Err(err) => {
                self.fatal.raise(format!(
                    "cannot read the group's committed offsets of partitions {partitions:?}: {err}; \
                     stopping rather than planning their recovery on a guess"
                ));
                return;
            }
        };
        if let Err(err) = self.start_uncommitted_after_the_bucket(&partitions, &mut committed) {
            self.fatal.raise(format!(
                "cannot read where the bucket's archive ends for partitions without a commit: \
                 {err}; stopping rather than archiving their retained log a second time"
            ));
            return;
        }
        let mut replies = Vec::new();
        for &partition in &partitions {
            let (committed, intent) = committed
                .remove(&partition)
                .expect("read_committed answers for every partition asked");
            let replay_rules = match self.replay_rules_for(partition, intent.as_ref()) {
                Ok(rules) => rules,
                Err(Hold::Partition) => continue,
                Err(Hold::Stop) => return,
            };
            let epoch = self.assignments.assign(partition);
            let (reply, answer) = sync_channel(1);
            if let Committed::Offset(offset) = committed {
                self.committed
                    .lock()
                    .expect("lock")
                    .insert(partition, offset);
            }
            let command = WorkerCommand::Assign {
                partition,
                epoch,
                committed,
                intent,
                log_start: self.log_start(consumer, partition),
                replay_rules,
                reply,
            };
            if self.worker(partition).send(command).is_err() {
                self.fatal.raise("buffer worker stopped".into());
                return;
            }
            replies.push((partition, answer));
        }
        for (partition, answer) in replies {
            match answer.recv() {
                Ok(Ok(Some(offset))) => {
                    let _ =
                        tpl.set_partition_offset(&self.topic, partition, Offset::Offset(offset));
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) => self.fatal.raise(err.to_string()),
                Err(_) => self.fatal.raise("buffer worker stopped".into()),
            }
        }
        self.metrics
            .assigned_partitions
            .set(self.assignments.partitions().len() as i64);
        tracing::info!(partitions = ?partitions, "partitions assigned");
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

    /// The partition's first offset in the log now, if the broker answers (a hint: without it
    /// a deleted range is still recorded as a gap, only not known as deleted).
    fn log_start(&self, consumer: &BaseConsumer<Self>, partition: i32) -> Option<i64> {
        match consumer.fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT) {
            Ok((low, _)) if low >= 0 => Some(low),
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(partition, error = %err, "cannot read the log's first offset");
                None
            }
        }
    }

    /// A partition without a commit (a new `group.id`, offsets expired) whose batches the bucket
    /// already holds resumes after its newest manifest instead of the log's start.
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
            if let Some(end) = end {
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

    /// The group's committed offset and intent of every partition in `tpl`, asked again until
    /// the broker answered for each one.
    fn fetch_committed(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        partitions: &[i32],
    ) -> Result<CommittedOffsets, String> {
        let what = "the committed offsets";
        committed::fetch_until_known(
            what,
            COMMITTED_PATIENCE,
            Instant::now,
            std::thread::sleep,
            || {
                let list = consumer
                    .committed_offsets(tpl.clone(), BROKER_TIMEOUT)
                    .map_err(|err| err.to_string())?;
                let entries =
                    list.elements_for_topic(&self.topic)
                        .into_iter()
                        .map(|e| CommittedEntry {
                            partition: e.partition(),
                            offset: match e.offset() {
                                Offset::Offset(offset) => Some(offset),
                                _ => None,
                            },
                            metadata: e.metadata().to_string(),
                            error: e.error().err().map(|err| err.to_string()),
                        });
                committed::read_committed(partitions, entries)
            },
        )
    }
}

impl ClientContext for ArchiverContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
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
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
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
                self.on_assign(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(err) = result {
                    self.fatal
                        .raise(format!("cannot apply partition assignment: {err}"));
                }
                // librdkafka keeps a partition's pause across its revocation: one paused for the
                // disk budget, revoked and assigned back would never be read again (seen in the
                // chaos test). Whatever is assigned starts unpaused; backpressure pauses it anew.
                if let Err(err) = consumer.resume(tpl) {
                    tracing::warn!(error = %err, "cannot resume the newly assigned partitions");
                }
                let held = self.held_partitions();
                if !held.is_empty() {
                    let mut list = TopicPartitionList::new();
                    for partition in held {
                        list.add_partition(&self.topic, partition);
                    }
                    if let Err(err) = consumer.pause(&list) {
                        self.fatal
                            .raise(format!("cannot pause the held partitions: {err}"));
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

/// Builds the consumer with the settings the archive's guarantees rely on.
/// librdkafka settings the archiver changes unless `kafka.properties` sets them.
const LIBRDKAFKA_DEFAULTS: &[(&str, &str)] = &[
    // Feeds the lag metrics.
    ("statistics.interval.ms", "5000"),
    ("auto.offset.reset", "earliest"),
    // What librdkafka prefetches ahead of the workers; its 64 MB default would be a large share
    // of a pod's memory and buys nothing once the workers are the bottleneck.
    ("queued.max.messages.kbytes", "16384"),
    // librdkafka keeps fetching a partition until it holds this many records (100,000 by
    // default, per partition): with 64 partitions that overran the kilobyte cap above at
    // start-up, the peak of the memory benchmark.
    ("queued.min.messages", "10000"),
    // Queued records point into the fetch response that brought them, which stays in memory
    // until its last record is polled: with many partitions, librdkafka's 50 MB responses held
    // more than the queue itself.
    ("fetch.max.bytes", "16777216"),
    // Once the prefetch queue is full, librdkafka waits this long before fetching that
    // partition again; its 1 s default left the workers starved after every full queue (reading
    // took twice as long in `scripts/bench.sh`).
    ("fetch.queue.backoff.ms", "20"),
];

pub fn create_consumer(
    config: &Config,
    context: ArchiverContext,
) -> Result<BaseConsumer<ArchiverContext>, ConsumeError> {
    let mut client = ClientConfig::new();
    // Defaults first, so the operator's properties replace them.
    for (key, value) in LIBRDKAFKA_DEFAULTS {
        client.set(*key, *value);
    }
    for (key, value) in &config.kafka.properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            config.kafka.session_timeout_ms.to_string(),
        )
        .set("enable.partition.eof", "false")
        .set("client.id", "kafka-s3-archiver");
    if !config.kafka.group_instance_id.is_empty() {
        client.set("group.instance.id", &config.kafka.group_instance_id);
    }
    client
        .create_with_context(context)
        .map_err(|err| ConsumeError::Create(config.redact(&err.to_string())))
}

/// Consumer errors that no retry gets past — a setting the broker refuses, a permission it
/// denies, a batch this build cannot decode — with what the operator can do. librdkafka reports
/// them and tries again every few seconds; the archiver stops instead (readiness off, a clear
/// error, a restart by Kubernetes once the cause is fixed).
fn permanent_consume_error(code: rdkafka::types::RDKafkaErrorCode) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    Some(match code {
        Code::InvalidSessionTimeout => {
            "kafka.session_timeout_ms is outside what the broker allows \
             (group.min.session.timeout.ms to group.max.session.timeout.ms)"
        }
        Code::GroupAuthorizationFailed => {
            "the broker denies this consumer group: allow Read on the group (kafka.group_id)"
        }
        Code::TopicAuthorizationFailed => {
            "the broker denies the topic: allow Read and Describe on kafka.topic"
        }
        Code::InvalidGroupId => "the broker refuses kafka.group_id",
        Code::InconsistentGroupProtocol => {
            "other members of this group use another assignment strategy; the archiver needs \
             cooperative-sticky, so give it a group of its own"
        }
        Code::NotImplemented | Code::UnsupportedCompressionType => {
            "a record batch uses a compression codec this build cannot decode"
        }
        _ => return None,
    })
}

/// The message for a fatal librdkafka error (the client is unusable after one), with what an
/// operator can do about the common cause.
fn fatal_kafka_error(code: rdkafka::types::RDKafkaErrorCode, reason: &str) -> String {
    let hint = match code {
        rdkafka::types::RDKafkaErrorCode::FencedInstanceId => {
            "; another member of the group joined with the same group.instance.id \
             (kafka.group_instance_id): each pod needs its own"
        }
        _ => "",
    };
    format!("fatal kafka error ({code:?}): {reason}{hint}")
}

/// Everything the poll loop works with besides the consumer.
pub struct PollLoop {
    pub consumer: BaseConsumer<ArchiverContext>,
    pub topic: String,
    pub workers: Vec<SyncSender<WorkerCommand>>,
    pub commits: Receiver<CommitRequest>,
    pub assignments: Arc<Assignments>,
    pub disk: Arc<DiskUsage>,
    pub max_disk_bytes: u64,
    pub schedule: Schedule,
    /// Operator requests to seal ahead of the schedule.
    pub upload_now: Arc<UploadNow>,
    pub checkpoint_interval: Duration,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub fatal: Arc<Fatal>,
    pub shutdown: CancellationToken,
    pub grace: Duration,
    pub exactly_once: ExactlyOnce,
    /// Whether the first intent was read back from the broker yet.
    pub metadata_checked: std::cell::Cell<bool>,
}

impl PollLoop {
    /// Runs until shutdown, then stops in order: pause reading, checkpoint, give uploads and
    /// commits the grace period, stop the workers, close the consumer.
    pub fn run(self) -> Result<(), ConsumeError> {
        let result = self.run_until_shutdown();
        // From here on a revocation (the consumer closing) keeps local files: they are resumed
        // by the next run on this volume, or discarded then if another member moved on.
        self.consumer
            .context()
            .shutting_down
            .store(true, Ordering::SeqCst);
        for worker in &self.workers {
            let (reply, answer) = sync_channel(1);
            if worker.send(WorkerCommand::Stop { reply }).is_ok() {
                let _ = answer.recv();
            }
        }
        let fatal = self.fatal.get();
        if let Some((code, _)) = self.consumer.client().fatal_error() {
            // librdkafka's own fatal state: closing the client waits for a group that will
            // never answer (seen: rd_kafka_destroy hanging after FENCED_INSTANCE_ID). Nothing
            // is left to commit, and the process exits right after: leave the client be.
            tracing::info!(code = ?code, "not closing the kafka client after its fatal error");
            std::mem::forget(self.consumer);
        }
        result?;
        if let Some(message) = fatal {
            return Err(ConsumeError::Fatal(message));
        }
        tracing::info!("consumer closing");
        Ok(())
    }

    fn run_until_shutdown(&self) -> Result<(), ConsumeError> {
        self.consumer
            .subscribe(&[&self.topic])
            .map_err(|source| ConsumeError::Subscribe {
                topic: self.topic.clone(),
                source,
            })?;
        let mut pending = PendingCommits::default();
        let mut next_seal = self.schedule.next_after(self.clock.now());
        let mut next_checkpoint = Instant::now() + self.checkpoint_interval;
        let mut backpressure = Backpressure::new(self.max_disk_bytes);
        tracing::info!(topic = %self.topic, next_upload = %next_seal, "consuming");

        while !self.shutdown.is_cancelled() {
            if let Some((code, reason)) = self.consumer.client().fatal_error() {
                self.fatal.raise(fatal_kafka_error(code, &reason));
            }
            if let Some(message) = self.fatal.get() {
                return Err(ConsumeError::Fatal(message));
            }
            self.commit_pending(&mut pending);
            let now = self.clock.now();
            if now >= next_seal {
                self.broadcast(|| WorkerCommand::SealAll {
                    trigger: SealTrigger::Schedule,
                })?;
                next_seal = self.schedule.next_after(now);
            }
            if self.upload_now.take() {
                tracing::info!("upload requested: sealing every open batch");
                self.broadcast(|| WorkerCommand::SealAll {
                    trigger: SealTrigger::Requested,
                })?;
            }
            if Instant::now() >= next_checkpoint {
                self.broadcast(|| WorkerCommand::Checkpoint)?;
                next_checkpoint = Instant::now() + self.checkpoint_interval;
            }
            self.apply_backpressure(&mut backpressure);
            self.poll_round()?;
        }

        tracing::info!("shutting down: checkpointing and finishing uploads");
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assignment);
        }
        self.broadcast(|| WorkerCommand::Checkpoint)?;
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline
            && (self.metrics.uploads_in_flight.get() > 0 || !pending.is_empty())
        {
            if self.fatal.get().is_some() {
                break;
            }
            self.commit_pending(&mut pending);
            // Serves rebalance events; the partitions are paused, so nothing new arrives.
            self.poll_round()?;
        }
        self.commit_pending(&mut pending);
        Ok(())
    }

    /// Polls once (waiting briefly) and then drains what is ready, up to a round's worth,
    /// grouped per partition.
    fn poll_round(&self) -> Result<(), ConsumeError> {
        self.metrics.health.polled();
        let mut by_partition: HashMap<i32, Vec<Record>> = HashMap::new();
        let mut wait = POLL_WAIT;
        let mut count = 0;
        while count < MAX_RECORDS_PER_ROUND {
            let Some(result) = self.consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            match result {
                Ok(message) => {
                    count += 1;
                    self.metrics
                        .health
                        .brokers_down_since_ms
                        .store(0, Ordering::Relaxed);
                    let payload = message.payload().map(<[u8]>::to_vec);
                    self.metrics.records_consumed.inc();
                    self.metrics
                        .bytes_consumed
                        .inc_by(payload.as_ref().map_or(0, Vec::len) as u64);
                    let headers = message
                        .headers()
                        .map(|headers| {
                            headers
                                .iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    by_partition
                        .entry(message.partition())
                        .or_default()
                        .push(Record {
                            offset: message.offset(),
                            timestamp_ms: message.timestamp().to_millis(),
                            key: message.key().map(<[u8]>::to_vec),
                            payload,
                            headers,
                        });
                }
                Err(err) => {
                    if let Some(cause) = err.rdkafka_error_code().and_then(permanent_consume_error)
                    {
                        self.metrics
                            .consume_errors
                            .with_label_values(&["permanent"])
                            .inc();
                        // Retrying would only repeat it every few seconds, forever.
                        self.fatal.raise(format!(
                            "kafka consumer error the archiver cannot get past: {err}; {cause}"
                        ));
                        break;
                    }
                    self.metrics
                        .consume_errors
                        .with_label_values(&["transient"])
                        .inc();
                    if self.consumer.context().throttle.allow(&err.to_string()) {
                        tracing::warn!(error = %err, "kafka poll error (repeats within 10s not logged)");
                    }
                    break;
                }
            }
        }
        for (partition, records) in by_partition {
            let worker = worker_for(&self.workers, partition);
            // Blocks when the worker is behind: backpressure on reading, never a lost record.
            worker
                .send(WorkerCommand::Records { partition, records })
                .map_err(|_| ConsumeError::Fatal("buffer worker stopped".into()))?;
        }
        Ok(())
    }

    fn commit_pending(&self, pending: &mut PendingCommits) {
        while let Ok(request) = self.commits.try_recv() {
            pending.push(request, Instant::now());
        }
        if pending.is_empty() {
            return;
        }
        let outcomes = pending.run(
            Instant::now(),
            |partition, epoch| self.assignments.is_current(partition, epoch),
            |attempt| {
                let mut tpl = TopicPartitionList::new();
                let mut element = tpl.add_partition(&self.topic, attempt.partition);
                element
                    .set_offset(Offset::Offset(attempt.next_offset))
                    .map_err(|e| e.to_string())?;
                element.set_metadata(attempt.metadata.clone());
                self.consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
                    self.metrics.commit_errors.inc();
                    e.to_string()
                })?;
                // Before anyone uploads on the strength of the first intent, make sure the
                // broker kept it.
                if !attempt.metadata.is_empty()
                    && !self.check_metadata_kept(attempt.partition, &attempt.metadata)
                {
                    return Err("the broker does not keep commit metadata".into());
                }
                Ok(())
            },
        );
        for outcome in outcomes {
            match outcome {
                CommitOutcome::Committed(attempt) => {
                    self.metrics.commits.inc();
                    self.consumer
                        .context()
                        .committed
                        .lock()
                        .expect("lock")
                        .insert(attempt.partition, attempt.next_offset);
                    let intent = BatchIntent::decode(&attempt.metadata);
                    tracing::info!(
                        partition = attempt.partition,
                        offset = attempt.next_offset,
                        intent_end = intent.as_ref().map(|i| i.end),
                        "offset committed"
                    );
                    let worker = worker_for(&self.workers, attempt.partition);
                    let _ = worker.send(WorkerCommand::Committed {
                        partition: attempt.partition,
                        next_offset: attempt.next_offset,
                    });
                }
                CommitOutcome::Stale(attempt) => tracing::info!(
                    partition = attempt.partition,
                    offset = attempt.next_offset,
                    "not committing: partition no longer assigned under that epoch"
                ),
                CommitOutcome::Retry => {}
            }
        }
    }

    /// Reads the first intent back: a broker that drops commit metadata (tansu 0.6 does) cannot
    /// carry the exactly-once protocol, and saying so at once beats discovering duplicates.
    /// Returns whether uploads may go ahead on this intent.
    fn check_metadata_kept(&self, partition: i32, metadata: &str) -> bool {
        if self.metadata_checked.get() {
            return true;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        let read_back = match self.consumer.committed_offsets(tpl, BROKER_TIMEOUT) {
            Ok(list) => list
                .find_partition(&self.topic, partition)
                .map(|e| e.metadata().to_string()),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the intent back yet; will retry");
                return false;
            }
        };
        self.metadata_checked.set(true);
        if read_back.as_deref() == Some(metadata) {
            tracing::info!("the broker keeps offset-commit metadata: exactly-once batches are on");
            return true;
        }
        match self.exactly_once {
            ExactlyOnce::Required => {
                self.metadata_checked.set(false);
                self.fatal.raise(
                "the kafka broker dropped the metadata of an offset commit (read back empty), so \
                 batch intents cannot be recorded and exactly-once delivery is impossible with it; \
                 use a broker that keeps commit metadata, or set kafka.exactly_once = \"best-effort\" \
                 to run at-least-once"
                    .into(),
                );
                false
            }
            ExactlyOnce::BestEffort => {
                tracing::warn!("the kafka broker drops offset-commit metadata: running at-least-once (an upload interrupted by a rebalance may leave duplicates)");
                self.metrics.exactly_once_degraded.set(1);
                true
            }
        }
    }

    /// Pauses the assigned partitions when the local disk budget is used up, resumes them below
    /// 90 % (see `backpressure`); partitions replaying an intent read on.
    fn apply_backpressure(&self, backpressure: &mut Backpressure) {
        let used = self.disk.get();
        if used < self.max_disk_bytes && !backpressure.over_budget() && backpressure.paused() == 0 {
            return;
        }
        let was_over = backpressure.over_budget();
        let change =
            backpressure.plan(used, &self.assignments.partitions(), &self.disk.replaying());
        if backpressure.over_budget() != was_over {
            if backpressure.over_budget() {
                tracing::warn!(
                    buffered_bytes = used,
                    limit = self.max_disk_bytes,
                    "local disk budget used up: pausing partitions until uploads free space"
                );
            } else {
                tracing::info!(buffered_bytes = used, "resuming partitions");
            }
        }
        let list = |partitions: &[i32]| {
            let mut tpl = TopicPartitionList::new();
            for &partition in partitions {
                tpl.add_partition(&self.topic, partition);
            }
            tpl
        };
        if !change.pause.is_empty() {
            if let Err(err) = self.consumer.pause(&list(&change.pause)) {
                tracing::warn!(error = %err, partitions = ?change.pause, "cannot pause partitions");
            }
        }
        if !change.resume.is_empty() {
            if let Err(err) = self.consumer.resume(&list(&change.resume)) {
                tracing::warn!(error = %err, partitions = ?change.resume, "cannot resume partitions");
            }
        }
        self.metrics
            .paused_partitions
            .set(backpressure.paused() as i64);
    }

    fn broadcast(&self, command: impl Fn() -> WorkerCommand) -> Result<(), ConsumeError> {
        for worker in &self.workers {
            worker
                .send(command())
                .map_err(|_| ConsumeError::Fatal("buffer worker stopped".into()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ArchiverContext {
        let (tx, _rx) = sync_channel(1);
        ArchiverContext::new(
            "t".into(),
            vec![tx],
            Arc::new(Assignments::default()),
            Metrics::new(),
            Arc::new(Fatal::default()),
        )
    }

    #[test]
    fn errors_no_retry_gets_past_are_told_apart() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let hint = permanent_consume_error(Code::InvalidSessionTimeout).unwrap();
        assert!(hint.contains("kafka.session_timeout_ms"), "{hint}");
        assert!(permanent_consume_error(Code::TopicAuthorizationFailed).is_some());
        for transient in [
            Code::AllBrokersDown,
            Code::RequestTimedOut,
            Code::NotCoordinator,
            Code::RebalanceInProgress,
        ] {
            assert_eq!(permanent_consume_error(transient), None, "{transient:?}");
        }
    }

    #[test]
    fn tls_and_sasl_settings_pass_through_to_librdkafka() {
        let mut config = Config::default();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "archiver"),
            ("sasl.password", "s3cr3t-value"),
            ("ssl.endpoint.identification.algorithm", "https"),
        ] {
            config.kafka.properties.insert(key.into(), value.into());
        }
        assert!(create_consumer(&config, context()).is_ok());
    }

    #[test]
    fn a_rejected_secret_property_is_redacted_from_the_error() {
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert("sasl.password".into(), "s3cr3t-value".into());
        config
            .kafka
            .properties
            .insert("sasl.mechanisms".into(), "NO-SUCH-MECHANISM".into());
        config
            .kafka
            .properties
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        let Err(err) = create_consumer(&config, context()) else {
            panic!("an unknown SASL mechanism must be refused");
        };
        let message = err.to_string();
        assert!(message.contains("NO-SUCH-MECHANISM"), "{message}");
        assert!(!message.contains("s3cr3t-value"), "{message}");
    }
}
