//! Upload: puts sealed batches in S3 and then asks the poll loop to commit their offsets.
//!
//! Batches of one partition are uploaded strictly in order (a later batch's commit would also
//! cover an earlier one), different partitions in parallel; all requests share one concurrency
//! limit. Every failure is retried with jittered backoff until it succeeds or the partition is
//! no longer ours: a batch never leaves the local disk before its commit.

pub mod retry;
pub mod s3;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::buffer::{SealedBatch, SealedFile};
use crate::commit::{Assignments, CommitRequest};
use crate::layout;
use crate::metrics::Metrics;
use retry::{Backoff, ErrorClass};
use s3::{ObjectMetadata, S3Error, S3Store};

/// A sealed batch to upload, tagged with the assignment it was read under.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub epoch: u64,
    pub batch: SealedBatch,
}

/// Why a batch was not uploaded.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("partition {partition} is no longer assigned to this member")]
    NotOwner { partition: i32 },
    #[error("uploader is shutting down")]
    ShuttingDown,
}

pub struct Uploader {
    pub store: S3Store,
    pub prefix: String,
    pub assignments: Arc<Assignments>,
    pub commits: std::sync::mpsc::Sender<CommitRequest>,
    pub metrics: Metrics,
    pub concurrency: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Uploader {
    /// Runs until `stop` fires; jobs come from the buffer workers.
    pub async fn run(self, mut jobs: UnboundedReceiver<UploadJob>, stop: CancellationToken) {
        let shared = Arc::new(Shared {
            permits: Semaphore::new(self.concurrency),
            uploader: self,
        });
        let mut partitions: HashMap<i32, UnboundedSender<UploadJob>> = HashMap::new();
        let mut tasks = JoinSet::new();
        loop {
            let job = tokio::select! {
                _ = stop.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
            };
            let partition = job.batch.partition;
            let queue = partitions.entry(partition).or_insert_with(|| {
                let (tx, rx) = unbounded_channel();
                tasks.spawn(Arc::clone(&shared).partition_task(partition, rx, stop.clone()));
                tx
            });
            if let Err(returned) = queue.send(job) {
                // The task ended (it only does at shutdown); start a fresh one.
                let (tx, rx) = unbounded_channel();
                tasks.spawn(Arc::clone(&shared).partition_task(partition, rx, stop.clone()));
                let _ = tx.send(returned.0);
                partitions.insert(partition, tx);
            }
        }
        drop(partitions);
        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
}

struct Shared {
    uploader: Uploader,
    permits: Semaphore,
}

impl Shared {
    async fn partition_task(
        self: Arc<Self>,
        partition: i32,
        mut jobs: UnboundedReceiver<UploadJob>,
        stop: CancellationToken,
    ) {
        loop {
            let job = tokio::select! {
                _ = stop.cancelled() => return,
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
            };
            let u = &self.uploader;
            if !u.assignments.is_current(partition, job.epoch) {
                continue;
            }
            u.metrics.uploads_in_flight.inc();
            let result = Arc::clone(&self).upload_batch(&job, &stop).await;
            u.metrics.uploads_in_flight.dec();
            match result {
                Ok(()) => {
                    u.metrics.batches_uploaded.inc();
                    u.metrics
                        .last_upload_timestamp
                        .set(chrono::Utc::now().timestamp());
                    tracing::info!(
                        partition,
                        start = job.batch.start,
                        end = job.batch.end,
                        objects = job.batch.files.len(),
                        records = job.batch.records(),
                        "batch uploaded"
                    );
                    let _ = u.commits.send(CommitRequest {
                        partition,
                        epoch: job.epoch,
                        next_offset: job.batch.end + 1,
                    });
                }
                Err(err) => {
                    tracing::info!(partition, start = job.batch.start, reason = %err, "batch upload abandoned");
                }
            }
        }
    }

    async fn upload_batch(
        self: Arc<Self>,
        job: &UploadJob,
        stop: &CancellationToken,
    ) -> Result<(), UploadError> {
        let mut files = JoinSet::new();
        for file in job.batch.files.clone() {
            let this = Arc::clone(&self);
            let batch = job.batch.clone();
            let epoch = job.epoch;
            let stop = stop.clone();
            files.spawn(async move { this.upload_file(&batch, epoch, &file, &stop).await });
        }
        let mut outcome = Ok(());
        while let Some(result) = files.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    outcome = Err(err);
                    files.abort_all();
                }
                Err(join) if join.is_cancelled() => {}
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        }
        outcome
    }

    /// Puts one object, retrying until it is in S3 or the partition is no longer ours.
    async fn upload_file(
        &self,
        batch: &SealedBatch,
        epoch: u64,
        file: &SealedFile,
        stop: &CancellationToken,
    ) -> Result<(), UploadError> {
        let u = &self.uploader;
        let key = layout::object_key(
            &u.prefix,
            &batch.topic,
            batch.partition,
            &file.destination,
            file.first_offset,
        );
        let metadata = ObjectMetadata {
            topic: batch.topic.clone(),
            partition: batch.partition,
            batch_start: batch.start,
            batch_end: batch.end,
            first_offset: file.first_offset,
            record_count: file.records,
        };
        let mut backoff = Backoff::new(u.initial_backoff, u.max_backoff, fastrand::Rng::new());
        let started = Instant::now();
        loop {
            if stop.is_cancelled() {
                return Err(UploadError::ShuttingDown);
            }
            if !u.assignments.is_current(batch.partition, epoch) {
                return Err(UploadError::NotOwner {
                    partition: batch.partition,
                });
            }
            let result = {
                let _permit = self.permits.acquire().await.expect("semaphore open");
                u.store
                    .put_file(&key, &file.path, file.stream.compressed_len, &metadata)
                    .await
            };
            match result {
                Ok(()) => {
                    u.metrics.objects_uploaded.inc();
                    u.metrics.upload_bytes.inc_by(file.stream.compressed_len);
                    u.metrics
                        .upload_duration
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(err) => {
                    let delay = backoff.next_delay(err.class);
                    self.report(&err, backoff.attempts(), delay);
                    tokio::select! {
                        _ = stop.cancelled() => return Err(UploadError::ShuttingDown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    u.metrics.upload_retries.inc();
                }
            }
        }
    }

    fn report(&self, err: &S3Error, attempts: u32, delay: Duration) {
        let u = &self.uploader;
        u.metrics
            .upload_errors
            .with_label_values(&[err.class.as_str()])
            .inc();
        match err.class {
            ErrorClass::Transient => tracing::warn!(
                error = %err,
                attempts,
                retry_in_ms = delay.as_millis() as u64,
                "s3 request failed, retrying"
            ),
            ErrorClass::Permanent => tracing::error!(
                error = %err,
                code = err.code.as_deref().unwrap_or(""),
                attempts,
                retry_in_ms = delay.as_millis() as u64,
                "s3 refused the request; the batch stays on disk and its offsets uncommitted until this is fixed"
            ),
        }
    }
}
