//! Events: one type per thing that happens in the data path that an operator sees, each emitting
//! its log line and its metrics together (as Vector's `internal_events` do), so the two cannot
//! drift apart and tests can assert on the counter an alert reads rather than on log text.
//! Stages build an event where it happens and hand it to [`Metrics::emit`].

use std::time::Duration;

use crate::checkpoint::Gap;
use crate::pipeline::SealTrigger;
use crate::retry::ErrorClass;

use super::Metrics;

/// Something that happened, with what the operator should see of it.
pub trait Event {
    fn emit(self, metrics: &Metrics);
}

impl Metrics {
    pub fn emit(&self, event: impl Event) {
        event.emit(self);
    }
}

/// A partition's batch was sealed and queued for upload.
pub struct BatchSealed<'a> {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
    pub files: usize,
    pub records: u64,
    pub trigger: SealTrigger,
    /// Offsets of the batch that held no record, and why.
    pub gaps: &'a [Gap],
    /// Finishing and fsyncing its files, writing the checkpoint.
    pub took: std::time::Duration,
}

impl Event for BatchSealed<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            partition = self.partition,
            start = self.start,
            end = self.end,
            files = self.files,
            records = self.records,
            trigger = self.trigger.as_str(),
            took_ms = self.took.as_millis() as u64,
            "batch sealed"
        );
        metrics
            .batches_sealed
            .with_label_values(&[self.trigger.as_str()])
            .inc();
        metrics.seal_duration.observe(self.took.as_secs_f64());
        for gap in self.gaps {
            metrics
                .offsets_without_record
                .with_label_values(&[gap.cause.as_str()])
                .inc_by(gap.offsets());
        }
    }
}

/// A member picked up the batch an interrupted upload recorded in its intent.
pub struct BatchReplayed {
    pub partition: i32,
    pub start: Option<i64>,
    pub end: i64,
}

impl Event for BatchReplayed {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            partition = self.partition,
            start = ?self.start,
            end = self.end,
            "replaying the batch an interrupted upload recorded"
        );
        metrics.batches_replayed.inc();
    }
}

/// Kafka no longer holds offsets this member had not archived (retention, DeleteRecords): the
/// consumer skips to the log start, and the batch's manifest records the range as deleted.
pub struct RecordsDeletedBeforeArchived {
    pub partition: i32,
    pub first_lost: i64,
    pub last_lost: i64,
    pub replaying: bool,
}

impl Event for RecordsDeletedBeforeArchived {
    fn emit(self, metrics: &Metrics) {
        tracing::error!(
            partition = self.partition,
            first_lost = self.first_lost,
            last_lost = self.last_lost,
            replaying = self.replaying,
            "records were deleted from kafka (retention or DeleteRecords) before they were archived"
        );
        metrics.offset_resets.inc();
    }
}

/// Every object of a batch is in the bucket; its completion is about to be committed.
pub struct BatchUploaded {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
    pub objects: usize,
    pub records: u64,
}

impl Event for BatchUploaded {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            partition = self.partition,
            start = self.start,
            end = self.end,
            objects = self.objects,
            records = self.records,
            "batch uploaded"
        );
        metrics.batches_uploaded.inc();
        metrics
            .last_upload_timestamp
            .set(chrono::Utc::now().timestamp());
    }
}

/// One object was written to the bucket.
pub struct ObjectUploaded<'a> {
    pub key: &'a str,
    pub bytes: u64,
    /// From the first attempt to success, retries included.
    pub took: Duration,
}

impl Event for ObjectUploaded<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::debug!(key = self.key, bytes = self.bytes, "object uploaded");
        metrics.objects_uploaded.inc();
        metrics.upload_bytes.inc_by(self.bytes);
        metrics.upload_duration.observe(self.took.as_secs_f64());
    }
}

/// A replayed or retried object was already in the bucket with the same lines: left alone.
pub struct ObjectAlreadyPresent<'a> {
    pub key: &'a str,
}

impl Event for ObjectAlreadyPresent<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::debug!(
            key = self.key,
            "object already in the bucket with the same lines"
        );
        metrics.objects_already_present.inc();
    }
}

/// An S3 request failed and will be tried again after `retry_in`.
pub struct S3RequestFailed<'a, E: std::fmt::Display> {
    pub error: &'a E,
    pub class: ErrorClass,
    /// S3's error code, when it sent one.
    pub code: Option<&'a str>,
    pub attempts: u32,
    pub retry_in: Duration,
}

impl<E: std::fmt::Display> Event for S3RequestFailed<'_, E> {
    fn emit(self, metrics: &Metrics) {
        metrics
            .upload_errors
            .with_label_values(&[self.class.as_str()])
            .inc();
        let retry_in_ms = self.retry_in.as_millis() as u64;
        match self.class {
            ErrorClass::Transient => tracing::warn!(
                error = %self.error,
                attempts = self.attempts,
                retry_in_ms,
                "s3 request failed, retrying"
            ),
            ErrorClass::Permanent => tracing::error!(
                error = %self.error,
                code = self.code.unwrap_or(""),
                attempts = self.attempts,
                retry_in_ms,
                "s3 refused the request; the batch stays on disk and its offsets uncommitted until this is fixed"
            ),
        }
    }
}

/// The group committed an offset (an intent before a batch's objects, or a completion after).
pub struct OffsetCommitted {
    pub partition: i32,
    pub offset: i64,
    /// The end of the batch the commit's intent names, if it carries one.
    pub intent_end: Option<i64>,
}

impl Event for OffsetCommitted {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            partition = self.partition,
            offset = self.offset,
            intent_end = self.intent_end,
            "offset committed"
        );
        metrics.commits.inc();
    }
}

/// An offset commit failed; it is retried until it goes through or the partition moves.
pub struct OffsetCommitFailed<'a> {
    pub partition: i32,
    pub next_offset: i64,
    pub attempts: u32,
    pub error: &'a str,
}

impl Event for OffsetCommitFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(
            partition = self.partition,
            next_offset = self.next_offset,
            attempts = self.attempts,
            error = self.error,
            "offset commit failed, will retry"
        );
        metrics.commit_errors.inc();
    }
}

/// The broker drops offset-commit metadata and `kafka.exactly_once = "best-effort"`: the member
/// runs at least once.
pub struct ExactlyOnceDegraded;

impl Event for ExactlyOnceDegraded {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!("the kafka broker drops offset-commit metadata: running at-least-once (an upload interrupted by a rebalance may leave duplicates)");
        metrics.exactly_once_degraded.set(1);
    }
}

/// A consumer error. A permanent one stops the member (the caller raises the fatal signal); a
/// transient one is logged unless the same message was logged within the last few seconds.
pub struct ConsumeErrorSeen<'a, E: std::fmt::Display> {
    pub error: &'a E,
    pub permanent: bool,
    /// Whether this repeat may be logged.
    pub log: bool,
}

impl<E: std::fmt::Display> Event for ConsumeErrorSeen<'_, E> {
    fn emit(self, metrics: &Metrics) {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        metrics.consume_errors.with_label_values(&[kind]).inc();
        if !self.permanent && self.log {
            tracing::warn!(error = %self.error, "kafka poll error (repeats within 10s not logged)");
        }
    }
}

/// A partition this member cannot replay is held: assigned, paused, never read.
pub struct PartitionHeld<'a, R: std::fmt::Display> {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
    pub reason: &'a R,
    /// Partitions held now, this one included.
    pub held: usize,
}

impl<R: std::fmt::Display> Event for PartitionHeld<'_, R> {
    fn emit(self, metrics: &Metrics) {
        tracing::error!(
            partition = self.partition,
            start = self.start,
            end = self.end,
            reason = %self.reason,
            "holding the partition: its interrupted batch cannot be replayed by this member"
        );
        metrics.partitions_held.set(self.held as i64);
    }
}

/// An object the batch cannot account for holds one of its keys (other lines, not another
/// attempt's of this batch): it is never replaced, and the upload waits, readiness off naming
/// the key, until the object is moved away or the partition moves. Reported once per wait.
pub struct ObjectKeyConflict<'a> {
    pub key: &'a str,
    pub partition: i32,
    pub batch_start: i64,
    pub batch_end: i64,
}

impl Event for ObjectKeyConflict<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::error!(
            key = self.key,
            partition = self.partition,
            batch_start = self.batch_start,
            batch_end = self.batch_end,
            "an object with other lines holds the key: not replacing it; the batch waits (readiness off) until the object is moved away"
        );
        let mut keys = metrics.health.conflicting_keys.lock().expect("lock");
        keys.insert(self.key.to_string());
        metrics.object_conflicts.set(keys.len() as i64);
    }
}

/// The upload that waited on a conflicting key is over: the key was freed and the object put,
/// or the partition moved, or the member stops.
pub struct ObjectKeyConflictEnded<'a> {
    pub key: &'a str,
}

impl Event for ObjectKeyConflictEnded<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(key = self.key, "no longer waiting on the key");
        let mut keys = metrics.health.conflicting_keys.lock().expect("lock");
        keys.remove(self.key);
        metrics.object_conflicts.set(keys.len() as i64);
    }
}

/// The local disk budget was used up (reading pauses) or freed again (reading resumes).
pub struct DiskBudget {
    pub over: bool,
    pub buffered_bytes: u64,
    pub limit: u64,
}

impl Event for DiskBudget {
    fn emit(self, _metrics: &Metrics) {
        if self.over {
            tracing::warn!(
                buffered_bytes = self.buffered_bytes,
                limit = self.limit,
                "local disk budget used up: pausing partitions until uploads free space"
            );
        } else {
            tracing::info!(buffered_bytes = self.buffered_bytes, "resuming partitions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::GapCause;

    #[test]
    fn each_event_moves_the_series_an_alert_reads() {
        let metrics = Metrics::new();
        let gaps = [
            Gap {
                first: 5,
                last: 7,
                cause: GapCause::NoRecord,
            },
            Gap {
                first: 0,
                last: 1,
                cause: GapCause::Deleted,
            },
        ];
        metrics.emit(BatchSealed {
            partition: 3,
            start: 0,
            end: 99,
            files: 2,
            records: 95,
            trigger: SealTrigger::DiskPressure,
            gaps: &gaps,
            took: Duration::from_millis(40),
        });
        assert_eq!(metrics.seal_duration.get_sample_count(), 1);
        assert!((metrics.seal_duration.get_sample_sum() - 0.04).abs() < 1e-9);
        let count =
            |vec: &prometheus::IntCounterVec, label: &str| vec.with_label_values(&[label]).get();
        assert_eq!(count(&metrics.batches_sealed, "disk-pressure"), 1);
        assert_eq!(count(&metrics.batches_sealed, "schedule"), 0);
        assert_eq!(count(&metrics.offsets_without_record, "no-record"), 3);
        assert_eq!(count(&metrics.offsets_without_record, "deleted"), 2);

        let error = "SlowDown";
        metrics.emit(S3RequestFailed {
            error: &error,
            class: ErrorClass::Transient,
            code: Some("SlowDown"),
            attempts: 1,
            retry_in: Duration::from_millis(200),
        });
        assert_eq!(count(&metrics.upload_errors, "transient"), 1);

        metrics.emit(OffsetCommitFailed {
            partition: 3,
            next_offset: 100,
            attempts: 2,
            error: "REBALANCE_IN_PROGRESS",
        });
        metrics.emit(OffsetCommitted {
            partition: 3,
            offset: 100,
            intent_end: None,
        });
        assert_eq!(metrics.commit_errors.get(), 1);
        assert_eq!(metrics.commits.get(), 1);

        metrics.emit(PartitionHeld {
            partition: 3,
            start: 0,
            end: 99,
            reason: &"routing code version 2",
            held: 1,
        });
        metrics.emit(ExactlyOnceDegraded);
        metrics.emit(RecordsDeletedBeforeArchived {
            partition: 3,
            first_lost: 0,
            last_lost: 1,
            replaying: true,
        });
        metrics.emit(ObjectKeyConflict {
            key: "k",
            partition: 3,
            batch_start: 0,
            batch_end: 99,
        });
        assert_eq!(metrics.object_conflicts.get(), 1);
        let problems = metrics.health.ready().unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("holds k")),
            "{problems:?}"
        );
        metrics.emit(ObjectKeyConflictEnded { key: "k" });
        assert_eq!(metrics.object_conflicts.get(), 0);
        assert_eq!(metrics.partitions_held.get(), 1);
        assert_eq!(metrics.exactly_once_degraded.get(), 1);
        assert_eq!(metrics.offset_resets.get(), 1);
    }
}
