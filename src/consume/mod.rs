//! Consume: the Kafka side. A blocking rdkafka poll loop on its own thread reads records and
//! hands them to the buffer workers over bounded channels, forwards what falls due
//! ([`Cadence`]: seals, checkpoints), pauses what [`Backpressure`] says, and commits what the
//! uploader asks ([`PendingCommits`]). The decisions live in those types; the loop only polls,
//! forwards and commits. It never waits on S3.
//!
//! Rebalance callbacks run inside `poll` on this thread (`context.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::buffer::DiskUsage;
use crate::commit::{Assignments, CommitOutcome, MetadataCheck, MetadataVerdict, PendingCommits};
use crate::config::Config;
use crate::kafka_client::{client_config, ClientRole};
use crate::metrics::events::{
    ConsumeErrorSeen, DiskBudget, ExactlyOnceDegraded, OffsetCommitFailed, OffsetCommitted,
};
use crate::metrics::Metrics;
use crate::pipeline::{
    worker_for, BatchIntent, CommitRequest, Fatal, QueuedRecords, Record, WorkerCommand,
};
use crate::schedule::{Cadence, Due};
use backpressure::Backpressure;
use errors::{fatal_kafka_error, permanent_consume_error, ErrorPlace};

pub mod backpressure;
pub mod committed;
pub mod context;
pub mod errors;
pub mod lag;
pub mod replay_rules;

pub use context::{ArchiverContext, BucketPosition, KeptIntents};

/// Records handed to the workers per poll round, at most.
const MAX_RECORDS_PER_ROUND: usize = 1000;
/// Bytes of records per poll round, at most (one record more than this still goes): a round of
/// 1,000 records of 1 MB would be a gigabyte.
const MAX_BYTES_PER_ROUND: u64 = 8 << 20;
/// How long one poll waits for a record when the topic is idle.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Broker round trips in rebalance callbacks.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Builds the archiving consumer (see `kafka_client` for its settings).
pub fn create_consumer(
    config: &Config,
    context: ArchiverContext,
) -> Result<BaseConsumer<ArchiverContext>, ConsumeError> {
    let client = client_config(&config.kafka, ClientRole::Archiver);
    client
        .create_with_context(context)
        .map_err(|err| ConsumeError::Create(config.redact(&err.to_string())))
}

/// The poll loop and what it forwards to and from.
pub struct PollLoop {
    pub consumer: BaseConsumer<ArchiverContext>,
    pub topic: String,
    /// One channel per buffer worker; a partition's records go to [`worker_for`] it.
    pub workers: Vec<SyncSender<WorkerCommand>>,
    /// Bytes of records in the workers' queues: a round waits until its records fit.
    pub queued: Arc<QueuedRecords>,
    /// Intents and completions the uploader asks to commit.
    pub commits: Receiver<CommitRequest>,
    /// Epochs of the partitions owned now: a commit of an older epoch is dropped.
    pub assignments: Arc<Assignments>,
    /// Bytes on the local volume, and the partitions replaying (never paused).
    pub disk: Arc<DiskUsage>,
    pub backpressure: Backpressure,
    pub cadence: Cadence,
    pub metadata: MetadataCheck,
    pub metrics: Metrics,
    pub fatal: Arc<Fatal>,
    pub shutdown: CancellationToken,
    /// Time given to uploads and commits after shutdown starts.
    pub grace: Duration,
}

impl PollLoop {
    /// Runs until shutdown, then stops in order: pause reading, checkpoint, give uploads and
    /// commits the grace period, stop the workers, close the consumer.
    pub fn run(mut self) -> Result<(), ConsumeError> {
        let result = self.run_until_shutdown();
        self.consumer.context().keep_local_files_on_revoke();
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

    fn run_until_shutdown(&mut self) -> Result<(), ConsumeError> {
        self.consumer
            .subscribe(&[&self.topic])
            .map_err(|source| ConsumeError::Subscribe {
                topic: self.topic.clone(),
                source,
            })?;
        let mut pending = PendingCommits::default();
        tracing::info!(topic = %self.topic, next_upload = %self.cadence.next_seal(), "consuming");

        while !self.shutdown.is_cancelled() {
            if let Some((code, reason)) = self.consumer.client().fatal_error() {
                self.fatal.raise(fatal_kafka_error(code, &reason));
            }
            if let Some(message) = self.fatal.get() {
                return Err(ConsumeError::Fatal(message));
            }
            self.commit_pending(&mut pending);
            for due in self.cadence.due(Instant::now()) {
                self.broadcast(|| match due {
                    Due::Seal(trigger) => WorkerCommand::SealAll { trigger },
                    Due::Checkpoint => WorkerCommand::Checkpoint,
                })?;
            }
            self.apply_backpressure();
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
        let (mut count, mut bytes) = (0, 0);
        while count < MAX_RECORDS_PER_ROUND && bytes < MAX_BYTES_PER_ROUND {
            let Some(result) = self.consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            match result {
                Ok(message) => {
                    count += 1;
                    let record = record_of(&message);
                    bytes += record.held_bytes();
                    self.metrics
                        .health
                        .brokers_down_since_ms
                        .store(0, Ordering::Relaxed);
                    self.metrics.records_consumed.inc();
                    self.metrics
                        .bytes_consumed
                        .inc_by(record.payload.as_ref().map_or(0, Vec::len) as u64);
                    by_partition
                        .entry(message.partition())
                        .or_default()
                        .push(record);
                }
                Err(err) => {
                    self.on_poll_error(err);
                    break;
                }
            }
        }
        if bytes > 0
            && !self.queued.admit(bytes, || {
                self.fatal.get().is_some() || self.shutdown.is_cancelled()
            })
        {
            // Stopping: what was polled is read again by whoever resumes the partitions.
            return Ok(());
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

    /// An error the consumer cannot get past stops the member (readiness off, one clear error);
    /// any other is counted and logged at most every few seconds, and librdkafka retries.
    fn on_poll_error(&self, err: KafkaError) {
        let cause = err.rdkafka_error_code().and_then(permanent_consume_error);
        self.metrics.emit(ConsumeErrorSeen {
            error: &err,
            permanent: cause.is_some(),
            log: cause.is_none() && self.consumer.context().log_allowed(&err.to_string()),
        });
        if let Some(cause) = cause {
            let text = err
                .rdkafka_error_code()
                .and_then(|code| self.consumer.context().take_error_text(code));
            let place = ErrorPlace::locate(text.as_deref().unwrap_or(""), &self.positions());
            let detail = text.map(|text| format!(" ({text})")).unwrap_or_default();
            // Retrying would only repeat it every few seconds, forever.
            self.fatal.raise(format!(
                "kafka consumer error the archiver cannot get past {place}: {err}{detail}; {cause}"
            ));
        }
    }

    /// The next offset to read of each assigned partition: librdkafka's position, or before the
    /// partition's first record where its assignment started (`None` if neither is known).
    fn positions(&self) -> Vec<(i32, Option<i64>)> {
        let Ok(positions) = self.consumer.position() else {
            return Vec::new();
        };
        positions
            .elements()
            .iter()
            .map(|element| {
                let partition = element.partition();
                match element.offset() {
                    Offset::Offset(next) => (partition, Some(next)),
                    _ => (partition, self.consumer.context().start_offset(partition)),
                }
            })
            .collect()
    }

    fn commit_pending(&mut self, pending: &mut PendingCommits) {
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
                self.consumer
                    .commit(&tpl, CommitMode::Sync)
                    .map_err(|e| e.to_string())?;
                // Before anyone uploads on the strength of the first intent, make sure the
                // broker kept it.
                if attempt.metadata.is_empty() || !self.metadata.needed() {
                    return Ok(());
                }
                let read_back = read_intent_back(&self.consumer, &self.topic, attempt.partition);
                match self.metadata.judge(&attempt.metadata, read_back) {
                    MetadataVerdict::Kept => Ok(()),
                    MetadataVerdict::Degraded => {
                        self.metrics.emit(ExactlyOnceDegraded);
                        Ok(())
                    }
                    MetadataVerdict::Unknown => Err("the intent was not read back yet".into()),
                    MetadataVerdict::Refused(message) => {
                        self.fatal.raise(message);
                        Err("the broker does not keep commit metadata".into())
                    }
                }
            },
        );
        for outcome in outcomes {
            match outcome {
                CommitOutcome::Committed(attempt) => {
                    let context = self.consumer.context();
                    if context.note_committed(attempt.partition, attempt.next_offset) {
                        // The group holds where the partition's archive starts: read it.
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(&self.topic, attempt.partition);
                        if let Err(err) = self.consumer.resume(&tpl) {
                            tracing::warn!(error = %err, partition = attempt.partition, "cannot resume the partition");
                        }
                    }
                    self.metrics.emit(OffsetCommitted {
                        partition: attempt.partition,
                        offset: attempt.next_offset,
                        intent_end: BatchIntent::decode(&attempt.metadata).map(|i| i.end),
                    });
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
                CommitOutcome::Retry {
                    attempt,
                    attempts,
                    error,
                } => self.metrics.emit(OffsetCommitFailed {
                    partition: attempt.partition,
                    next_offset: attempt.next_offset,
                    attempts,
                    error: &error,
                }),
            }
        }
    }

    /// Pauses the assigned partitions when the local disk budget is used up, resumes them below
    /// 90 % (see `backpressure`); partitions replaying an intent read on.
    fn apply_backpressure(&mut self) {
        let used = self.disk.get();
        let backpressure = &mut self.backpressure;
        if used < backpressure.max_disk_bytes()
            && !backpressure.over_budget()
            && backpressure.paused() == 0
        {
            return;
        }
        let was_over = backpressure.over_budget();
        // A partition waiting for its first contact to go in stays paused whatever the budget.
        let context = self.consumer.context();
        let readable: Vec<i32> = self
            .assignments
            .partitions()
            .into_iter()
            .filter(|&partition| !context.awaits_first_contact(partition))
            .collect();
        let change = backpressure.plan(used, &readable, &self.disk.replaying());
        if backpressure.over_budget() != was_over {
            self.metrics.emit(DiskBudget {
                over: backpressure.over_budget(),
                buffered_bytes: used,
                limit: backpressure.max_disk_bytes(),
            });
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

/// The record the buffers own, copied out of librdkafka's message.
fn record_of(message: &BorrowedMessage) -> Record {
    // Not rdkafka's `headers()`: it panics on a key that is not UTF-8, which any producer can send.
    let headers = crate::kafka_client::headers::read_all(message);
    Record {
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// The metadata the group holds for `partition`, as the coordinator answers now.
fn read_intent_back(
    consumer: &BaseConsumer<ArchiverContext>,
    topic: &str,
    partition: i32,
) -> Result<Option<String>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let list = consumer
        .committed_offsets(tpl, BROKER_TIMEOUT)
        .map_err(|err| err.to_string())?;
    Ok(list
        .find_partition(topic, partition)
        .map(|e| e.metadata().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ArchiverContext {
        let (tx, _rx) = sync_channel(1);
        let (commits, _) = std::sync::mpsc::channel();
        ArchiverContext::new(
            "t".into(),
            vec![tx],
            commits,
            Arc::new(Assignments::default()),
            Metrics::new(),
            Arc::new(Fatal::default()),
        )
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
