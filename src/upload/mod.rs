//! Upload: the exactly-once protocol for one sealed batch, in this order:
//!
//! 1. record the intent — keep the files the batch was cut into (its plan) in the bucket under
//!    their hash, so a replay cuts where the first attempt did; commit the batch's first offset
//!    with `[start, end]`, the cutting rules and the plan's hash as metadata (fenced by the
//!    group generation, so a zombie cannot); then keep the same intent in the bucket beside the
//!    partition, so a group that loses its offsets loses no intent;
//! 2. put every object (deterministic keys: a replay rewrites the same ones);
//! 3. put the batch manifest;
//! 4. commit `end + 1`.
//!
//! A member that crashes or loses the partition anywhere in between leaves the intent behind;
//! the next owner replays exactly that batch and finishes it. Batches of one partition go
//! strictly in order, partitions in parallel, all requests under one concurrency limit. Every
//! failure is retried with jittered backoff until it succeeds or the partition is no longer ours:
//! a batch never leaves the local disk before its commit.
//!
//! Beside the protocol, `suppression` keeps the suppression list in the bucket (`suppress`'s
//! requests, and the lists members store before they cut with them).

mod adopt;
pub mod manifest;
pub mod s3;
pub mod store;
pub mod suppression;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::commit::Assignments;
use crate::layout;
use crate::metrics::events::{
    BatchUploaded, ObjectAlreadyPresent, ObjectKeyConflict, ObjectKeyConflictEnded, ObjectUploaded,
    S3RequestFailed,
};
use crate::metrics::Metrics;
use crate::pipeline::{
    BatchIntent, CommitRequest, CommitResult, KeptIntent, PlannedFile, SealedBatch, SealedFile,
    UploadJob,
};
use crate::retry::Backoff;
use crate::rules::{rules_key, CuttingRules};
use manifest::{Manifest, ManifestFile};
use s3::{ObjectMetadata, PutOutcome, S3Error, S3Store};
use store::ObjectStore;

/// The last offset the bucket holds for a partition: the end of its newest batch manifest.
/// Batches of a partition go up strictly in order and a manifest only after all of its objects,
/// so every offset up to it is archived.
pub async fn newest_manifest_end(
    store: &impl ObjectStore,
    prefix: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, S3Error> {
    let manifests = store
        .list(&layout::manifest_prefix(prefix, topic, partition))
        .await?;
    Ok(manifests
        .iter()
        .filter_map(|(key, _)| layout::manifest_range(key))
        .map(|(_, end)| end)
        .max())
}

/// Where the bucket says a partition's archive stands: what a member goes by for a partition
/// the group has no commit for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveEnd {
    /// The end of the newest batch manifest: every offset up to it is archived.
    pub manifest_end: Option<i64>,
    /// The newest intent the bucket keeps, when its batch has no manifest yet: an upload that was
    /// interrupted, whose range must be replayed exactly, not cut again.
    pub interrupted: Option<BatchIntent>,
}

/// Reads the partition's newest manifest and kept intent (see [`layout::intent_key`]).
pub async fn archive_end(
    store: &impl ObjectStore,
    prefix: &str,
    topic: &str,
    partition: i32,
) -> Result<ArchiveEnd, S3Error> {
    let manifest_end = newest_manifest_end(store, prefix, topic, partition).await?;
    let interrupted = kept_intent(store, prefix, topic, partition)
        .await?
        .map(|kept| kept.intent)
        .filter(|intent| manifest_end.is_none_or(|end| intent.end > end));
    Ok(ArchiveEnd {
        manifest_end,
        interrupted,
    })
}

/// The intent the bucket keeps for a partition, with the files its batch was cut into.
pub async fn kept_intent(
    store: &impl ObjectStore,
    prefix: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<KeptIntent>, S3Error> {
    let kept = store
        .get_bytes(&layout::intent_key(prefix, topic, partition))
        .await?;
    Ok(kept.and_then(|bytes| KeptIntent::decode(&bytes)))
}

/// The files `intent`'s batch was first cut into, as the bucket keeps them: the plan it names,
/// or for an intent an earlier release recorded, the partition's kept intent when it is that
/// one. Empty when the bucket keeps neither (the replay then cuts by size again).
pub async fn planned_files(
    store: &impl ObjectStore,
    prefix: &str,
    topic: &str,
    partition: i32,
    intent: &BatchIntent,
) -> Result<Vec<PlannedFile>, S3Error> {
    if let Some(hash) = &intent.plan {
        let key = layout::plan_key(prefix, topic, partition, intent.start, intent.end, hash);
        let plan = store.get_bytes(&key).await?;
        if let Some(plan) = plan.and_then(|bytes| KeptIntent::decode(&bytes)) {
            if plan.is_plan_of(intent) {
                return Ok(plan.files);
            }
        }
        tracing::warn!(
            partition,
            key,
            "the plan the intent names is not in the bucket (deleted?): looking for it beside the partition's intent"
        );
    }
    Ok(kept_intent(store, prefix, topic, partition)
        .await?
        .filter(|kept| kept.is_plan_of(intent))
        .map(|kept| kept.files)
        .unwrap_or_default())
}

/// Why a batch was not uploaded.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("partition {partition} is no longer assigned to this member")]
    NotOwner { partition: i32 },
    #[error("uploader is shutting down")]
    ShuttingDown,
    /// Not a failure: the batch's manifest is up, so every object it lists is (another
    /// attempt, or a member that took the partition over, finished it).
    #[error("batch at {start} of partition {partition} was finished by another attempt")]
    Finished { partition: i32, start: i64 },
}

/// The upload stage: one task per partition with batches to upload, all of them sharing one
/// concurrency limit. `S` is the bucket (S3, or the simulation's store).
pub struct Uploader<S: ObjectStore = S3Store> {
    pub store: S,
    pub prefix: String,
    pub assignments: Arc<Assignments>,
    pub commits: std::sync::mpsc::Sender<CommitRequest>,
    pub metrics: Metrics,
    pub concurrency: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The rules this member cuts with, stored in the bucket before the first intent that
    /// names their hash.
    pub rules: CuttingRules,
    /// Seeds the retry jitter: random in production, the simulation's seed in its runs, so a
    /// seed replays the same delays.
    pub jitter_seed: u64,
}

impl<S: ObjectStore> Uploader<S> {
    /// Runs until `stop` fires; jobs come from the buffer workers.
    pub async fn run(self, mut jobs: UnboundedReceiver<UploadJob>, stop: CancellationToken) {
        let shared = Arc::new(Shared {
            permits: Semaphore::new(self.concurrency),
            rules_hash: self.rules.hash(),
            rules_stored: AtomicBool::new(false),
            jitter: std::sync::Mutex::new(fastrand::Rng::with_seed(self.jitter_seed)),
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

struct Shared<S: ObjectStore> {
    uploader: Uploader<S>,
    permits: Semaphore,
    rules_hash: String,
    /// Whether this member's rules are in the bucket yet.
    rules_stored: AtomicBool,
    /// Where each request's backoff draws its jitter from (see `Uploader::jitter_seed`).
    jitter: std::sync::Mutex<fastrand::Rng>,
}

impl<S: ObjectStore> Shared<S> {
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
                    u.metrics.emit(BatchUploaded {
                        partition,
                        start: job.batch.start,
                        end: job.batch.end,
                        objects: job.batch.files.len(),
                        records: job.batch.records(),
                    });
                    let _ = u.commits.send(CommitRequest {
                        partition,
                        epoch: job.epoch,
                        next_offset: job.batch.end + 1,
                        metadata: String::new(),
                        reply: None,
                    });
                }
                Err(err) => {
                    tracing::info!(partition, start = job.batch.start, reason = %err, "batch upload abandoned");
                }
            }
        }
    }

    /// Steps 1 to 3 of the protocol; the caller commits `end + 1`.
    async fn upload_batch(
        self: Arc<Self>,
        job: &UploadJob,
        stop: &CancellationToken,
    ) -> Result<(), UploadError> {
        let u = &self.uploader;
        let (batch, epoch) = (&job.batch, job.epoch);
        let key = layout::manifest_key(
            &u.prefix,
            &batch.topic,
            batch.partition,
            batch.start,
            batch.end,
        );
        if job.may_exist {
            // A manifest goes up after every object it lists: the interrupted upload only
            // missed its completion commit, and putting the manifest again would rewrite it.
            let present = self
                .with_retries(batch.partition, epoch, stop, |_| {
                    u.store.head_metadata(&key)
                })
                .await?;
            if present.is_some() {
                return Ok(());
            }
        }
        let planned = match self.record_intent(job, stop).await {
            Err(UploadError::Finished { .. }) => return Ok(()),
            planned => planned?,
        };
        let (files, may_appear) = match Arc::clone(&self).put_objects(job, planned, stop).await {
            Err(UploadError::Finished { .. }) => return Ok(()),
            files => files?,
        };
        // The id index before the manifest: a manifest this release wrote has its index. Not
        // on a store that ignores `If-None-Match`: there another attempt may replace an
        // object with one holding lines the index never saw.
        let entries = if u.store.conditional_writes() {
            index_entries(&u.prefix, batch, &files)
        } else {
            Vec::new()
        };
        let filter_bytes: usize = entries.iter().map(|(_, f)| f.heap_bytes()).sum();
        let encode = move || {
            let mut index = crate::index::BatchIndex::new();
            for (key, filter) in entries {
                index.add(key, &filter);
            }
            index.to_json()
        };
        let index = match filter_bytes {
            0 => None,
            // A typical batch's filters encode in well under a millisecond: here, rather than
            // on one of many blocking threads at once (each a heap of its own: the memory
            // benchmark's 64 partitions sealing together peaked 74 MB higher that way).
            bytes if bytes < INLINE_INDEX_BYTES => Some(encode()),
            _ => Some(
                tokio::task::spawn_blocking(encode)
                    .await
                    .expect("index thread"),
            ),
        };
        if let Some(body) = index {
            let index_key = crate::index::index_key(
                &u.prefix,
                &batch.topic,
                batch.partition,
                batch.start,
                batch.end,
            );
            self.with_retries(batch.partition, epoch, stop, |_| {
                u.store
                    .put_bytes(&index_key, body.clone(), "application/json")
            })
            .await?;
        }
        let mut manifest = Manifest::with_files(batch, files);
        manifest.may_appear = may_appear;
        let body = manifest.to_json();
        let key = &key;
        self.with_retries(batch.partition, epoch, stop, |_| {
            let body = body.clone();
            async move {
                // Another attempt's manifest is never replaced: it lists what that attempt put.
                if u.store.head_metadata(key).await?.is_none() {
                    u.store.put_bytes(key, body, "application/json").await?;
                }
                Ok(())
            }
        })
        .await
    }

    /// Keeps the batch's plan in the bucket, commits the batch's first offset with the intent
    /// that names it and waits until the broker took it, then keeps the intent in the bucket
    /// for a group that loses its offsets. Answers the files the batch's first attempt cut: this
    /// batch's own, or those of the attempt it continues (`UploadJob::plan`).
    async fn record_intent(
        &self,
        job: &UploadJob,
        stop: &CancellationToken,
    ) -> Result<Vec<PlannedFile>, UploadError> {
        let u = &self.uploader;
        let (partition, epoch) = (job.batch.partition, job.epoch);
        // The rules an intent names must be in the bucket first: the next owner reads them
        // there to replay the batch. A replay names the rules of the intent it fetched them for.
        if job.batch.rules == self.rules_hash && !self.rules_stored.load(Ordering::Relaxed) {
            let key = rules_key(&u.prefix, &self.rules_hash);
            let body = u.rules.to_json();
            self.with_retries(partition, epoch, stop, |_| {
                u.store.put_bytes(&key, body.clone(), "application/json")
            })
            .await?;
            self.rules_stored.store(true, Ordering::Relaxed);
        }
        let ours = KeptIntent::of_batch(&job.batch, &job.plan);
        let body = ours.encode();
        // Before the commit: whoever replays the intent reads the plan it names, so a member
        // that stops right after committing (or freezes, and thaws as a zombie) cannot leave a
        // replay that cuts elsewhere than the objects it may still put.
        let hash = ours
            .intent
            .plan
            .as_deref()
            .expect("a batch's intent names its plan");
        let plan_key = layout::plan_key(
            &u.prefix,
            &job.batch.topic,
            partition,
            job.batch.start,
            job.batch.end,
            hash,
        );
        self.with_retries(partition, epoch, stop, |_| {
            u.store
                .put_bytes(&plan_key, body.clone(), "application/json")
        })
        .await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = CommitRequest {
            partition,
            epoch,
            next_offset: job.batch.start,
            metadata: ours.intent.encode(),
            reply: Some(reply),
        };
        if u.commits.send(request).is_err() {
            return Err(UploadError::ShuttingDown);
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(UploadError::ShuttingDown),
            result = answer => match result {
                Ok(CommitResult::Committed) => {}
                Ok(CommitResult::NotOwner) => return Err(UploadError::NotOwner { partition }),
                Err(_) => return Err(UploadError::ShuttingDown),
            },
        }
        // After the commit, so only the owner the group accepted writes it; before any object,
        // so no object of the batch is in the bucket without an intent that names its range.
        let key = layout::intent_key(&u.prefix, &job.batch.topic, partition);
        let manifest = layout::manifest_key(
            &u.prefix,
            &job.batch.topic,
            partition,
            job.batch.start,
            job.batch.end,
        );
        let (key, manifest, body) = (&key, &manifest, &body);
        let finished = self
            .with_retries(partition, epoch, stop, |_| async move {
                // A member that froze after its commit (a zombie that has not heard yet) and
                // thaws once another finished the batch would put back an intent older than
                // the one the bucket keeps now: a group that then loses its offsets would cut
                // the newer batch's range again, beside the objects it already put.
                if u.store.head_metadata(manifest).await?.is_some() {
                    return Ok(true);
                }
                u.store
                    .put_bytes(key, body.clone(), "application/json")
                    .await
                    .map(|()| false)
            })
            .await?;
        if finished {
            return Err(UploadError::Finished {
                partition,
                start: job.batch.start,
            });
        }
        Ok(ours.files)
    }

    /// Puts every object of the batch, in parallel within the concurrency limit; answers the
    /// manifest's entries, and those of planned files Kafka kept nothing of and no attempt put
    /// (`Manifest::may_appear`). A replay adopts what an earlier attempt put of `planned` files
    /// that Kafka no longer holds all of (see `adopt`).
    async fn put_objects(
        self: Arc<Self>,
        job: &UploadJob,
        planned: Vec<PlannedFile>,
        stop: &CancellationToken,
    ) -> Result<(Vec<ManifestFile>, Vec<ManifestFile>), UploadError> {
        let mut planned: HashMap<_, _> = planned
            .into_iter()
            .map(|file| ((file.destination.clone(), file.first_offset), file))
            .collect();
        let batch = Arc::new(job.batch.clone());
        let mut plans: Vec<Option<PlannedFile>> = batch
            .files
            .iter()
            .map(|file| planned.remove(&(file.destination.clone(), file.first_offset)))
            .collect();
        // At most as many uploads of a batch exist at once as may run: spawned all at once, a
        // sealing of 64 partitions' batches of 200 files held 12,800 upload futures waiting
        // for 8 permits, and the memory benchmark's peak rose by tens of megabytes with them.
        let mut uploads = JoinSet::new();
        let mut spawn = |uploads: &mut JoinSet<_>, index: usize| {
            let this = Arc::clone(&self);
            let batch = Arc::clone(&batch);
            let plan = plans[index].take();
            let (epoch, may_exist) = (job.epoch, job.may_exist);
            let stop = stop.clone();
            uploads.spawn(async move {
                let file = &batch.files[index];
                let result = this
                    .upload_file(&batch, epoch, file, plan.as_ref(), may_exist, &stop)
                    .await;
                (index, result)
            });
        };
        let in_flight = self.uploader.concurrency.max(1);
        let mut next = 0;
        while next < batch.files.len() && uploads.len() < in_flight {
            spawn(&mut uploads, next);
            next += 1;
        }
        let mut files: Vec<Option<ManifestFile>> = vec![None; batch.files.len()];
        let mut outcome = Ok(());
        while let Some(result) = uploads.join_next().await {
            match result {
                Ok((index, Ok(file))) => {
                    files[index] = Some(file);
                    if outcome.is_ok() && next < batch.files.len() {
                        spawn(&mut uploads, next);
                        next += 1;
                    }
                }
                Ok((_, Err(err))) => {
                    outcome = Err(err);
                    uploads.abort_all();
                }
                Err(join) if join.is_cancelled() => {}
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        }
        outcome?;
        let mut files: Vec<ManifestFile> = files.into_iter().flatten().collect();
        let mut may_appear = Vec::new();
        if job.may_exist {
            // Planned files Kafka kept no record of: the objects an attempt put are the batch's.
            let mut rest: Vec<PlannedFile> = planned.into_values().collect();
            rest.sort_by_key(|file| file.first_offset);
            for plan in rest {
                match self.adopt(&batch, job.epoch, &plan, None, stop).await? {
                    Some(adopted) => {
                        self.uploader
                            .metrics
                            .emit(ObjectAlreadyPresent { key: &adopted.key });
                        files.push(adopted);
                    }
                    None => may_appear.push(ManifestFile::of_planned(
                        &self.uploader.prefix,
                        &batch,
                        &plan,
                    )),
                }
            }
        }
        Ok((files, may_appear))
    }

    /// Puts one object, retrying until it is in S3 or the partition is no longer ours; answers
    /// its manifest entry. `planned`: the file as the batch's first attempt cut it.
    async fn upload_file(
        &self,
        batch: &SealedBatch,
        epoch: u64,
        file: &SealedFile,
        planned: Option<&PlannedFile>,
        may_exist: bool,
        stop: &CancellationToken,
    ) -> Result<ManifestFile, UploadError> {
        let u = &self.uploader;
        let fewer_lines =
            planned.filter(|p| (p.records, p.crc32) != (file.records, file.stream.crc32));
        if let Some(plan) = fewer_lines.filter(|_| may_exist) {
            // A replay Kafka deleted the head of: an attempt's object holds more of the file.
            if let Some(adopted) = self.adopt(batch, epoch, plan, Some(file), stop).await? {
                u.metrics.emit(ObjectAlreadyPresent { key: &adopted.key });
                return Ok(adopted);
            }
        }
        let key = layout::object_key(
            &u.prefix,
            &batch.topic,
            batch.partition,
            &file.destination,
            file.first_offset,
            file.codec,
        );
        let metadata = ObjectMetadata {
            topic: batch.topic.clone(),
            partition: batch.partition,
            batch_start: batch.start,
            batch_end: batch.end,
            first_offset: file.first_offset,
            record_count: file.records,
            content_crc32: file.stream.crc32,
            codec: file.codec,
        };
        let started = Instant::now();
        let still_ours = || u.assignments.is_current(batch.partition, epoch);
        let manifest = layout::manifest_key(
            &u.prefix,
            &batch.topic,
            batch.partition,
            batch.start,
            batch.end,
        );
        let (key_ref, manifest, metadata, still_ours) = (&key, &manifest, &metadata, &still_ours);
        // Set while the key holds an object with other lines: readiness names it until the
        // loop ends, however it ends (put, partition moved, shutdown).
        let mut conflict: Option<WaitingOnKey<'_>> = None;
        loop {
            let outcome = self
                .with_retries(batch.partition, epoch, stop, |attempt| async move {
                    // A batch whose manifest is up is finished: a member that froze mid-upload
                    // (a zombie that has not heard yet) and thaws after another finished it
                    // puts nothing more, not even objects the other's replay cut elsewhere.
                    if u.store.head_metadata(manifest).await?.is_some() {
                        return Ok(None);
                    }
                    // A failed attempt may still have written the object (a lost answer).
                    let may_exist = may_exist || attempt > 0;
                    u.store
                        .put_file(
                            key_ref,
                            &file.path,
                            file.stream.compressed_len,
                            metadata,
                            may_exist,
                            still_ours,
                        )
                        .await
                        .map(Some)
                })
                .await?;
            let Some(outcome) = outcome else {
                return Err(UploadError::Finished {
                    partition: batch.partition,
                    start: batch.start,
                });
            };
            match outcome {
                PutOutcome::Written => {
                    u.metrics.emit(ObjectUploaded {
                        key: &key,
                        bytes: file.stream.compressed_len,
                        took: started.elapsed(),
                    });
                    break;
                }
                PutOutcome::AlreadyPresent => {
                    u.metrics.emit(ObjectAlreadyPresent { key: &key });
                    break;
                }
                PutOutcome::Abandoned => {
                    return Err(UploadError::NotOwner {
                        partition: batch.partition,
                    })
                }
                PutOutcome::Conflict => {}
            }
            // Another attempt of this batch put the key first: adopted when it holds these lines
            // as its last ones, never replaced. Otherwise this member is a zombie that has not
            // heard yet (it will), or the bucket holds what the batch cannot account for, which
            // only an operator can settle.
            let plan = planned.cloned().unwrap_or_else(|| PlannedFile::of(file));
            if let Some(adopted) = self.adopt(batch, epoch, &plan, Some(file), stop).await? {
                u.metrics.emit(ObjectAlreadyPresent { key: &adopted.key });
                return Ok(adopted);
            }
            if conflict.is_none() {
                u.metrics.emit(ObjectKeyConflict {
                    key: &key,
                    partition: batch.partition,
                    batch_start: batch.start,
                    batch_end: batch.end,
                });
                conflict = Some(WaitingOnKey {
                    metrics: &u.metrics,
                    key: &key,
                });
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(UploadError::ShuttingDown),
                _ = tokio::time::sleep(u.max_backoff) => {}
            }
        }
        drop(conflict);
        Ok(ManifestFile::of_sealed(&u.prefix, batch, file))
    }

    /// Runs `request` (given the number of failed attempts so far) under the concurrency limit
    /// until it succeeds, backing off with jitter between attempts; gives up only when the
    /// partition is no longer ours or at shutdown.
    async fn with_retries<T, F, Fut>(
        &self,
        partition: i32,
        epoch: u64,
        stop: &CancellationToken,
        request: F,
    ) -> Result<T, UploadError>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let u = &self.uploader;
        let jitter = fastrand::Rng::with_seed(self.jitter.lock().expect("jitter lock").u64(..));
        let mut backoff = Backoff::new(u.initial_backoff, u.max_backoff, jitter);
        loop {
            if stop.is_cancelled() {
                return Err(UploadError::ShuttingDown);
            }
            if !u.assignments.is_current(partition, epoch) {
                return Err(UploadError::NotOwner { partition });
            }
            let result = {
                let _permit = self.permits.acquire().await.expect("semaphore open");
                // Asked again: the partition may have moved while this waited for a permit.
                if !u.assignments.is_current(partition, epoch) {
                    return Err(UploadError::NotOwner { partition });
                }
                request(backoff.attempts()).await
            };
            let err = match result {
                Ok(value) => {
                    u.metrics
                        .health
                        .s3_failing
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    return Ok(value);
                }
                Err(err) => err,
            };
            let delay = backoff.next_delay(err.class);
            if backoff.attempts() >= 3 {
                u.metrics
                    .health
                    .s3_failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            self.report(&err, backoff.attempts(), delay);
            tokio::select! {
                _ = stop.cancelled() => return Err(UploadError::ShuttingDown),
                _ = tokio::time::sleep(delay) => {}
            }
            u.metrics.upload_retries.inc();
        }
    }

    fn report(&self, err: &S3Error, attempts: u32, delay: Duration) {
        self.uploader.metrics.emit(S3RequestFailed {
            error: err,
            class: err.class,
            code: err.code.as_deref(),
            attempts,
            retry_in: delay,
        });
    }
}

/// An upload waiting on a key that holds an object with other lines: while it lives, readiness
/// and `archiver_object_conflicts` name the key.
struct WaitingOnKey<'a> {
    metrics: &'a Metrics,
    key: &'a str,
}

impl Drop for WaitingOnKey<'_> {
    fn drop(&mut self) {
        self.metrics.emit(ObjectKeyConflictEnded { key: self.key });
    }
}

/// Filters up to this size are encoded on the uploader's own thread.
const INLINE_INDEX_BYTES: usize = 1 << 20;

/// The entries of the id index of `batch` as uploaded (`files`: its manifest's entries): the
/// filter of each file whose object holds exactly the lines this attempt read. An adopted
/// object with lines Kafka deleted before this attempt read them, or a file whose ids are not
/// all known, has none (`forget` reads it whole).
fn index_entries(
    prefix: &str,
    batch: &SealedBatch,
    files: &[ManifestFile],
) -> Vec<(String, Arc<crate::index::IdFilter>)> {
    batch
        .files
        .iter()
        .filter_map(|file| {
            let filter = file.ids.as_ref()?;
            let key = ManifestFile::of_sealed(prefix, batch, file).key;
            let same_lines = files.iter().any(|entry| {
                entry.key == key && entry.deleted_from_kafka == 0 && entry.records == file.records
            });
            same_lines.then(|| (key, Arc::clone(filter)))
        })
        .collect()
}
