//! App: wires the stages together and owns their lifetimes.
//!
//! poll loop (thread) → records → buffer workers (threads) → sealed batches → uploader (async)
//! → commit requests → poll loop. `run` returns when `shutdown` fires (SIGTERM in the binary, a
//! token in tests) and every stage has stopped in order, or when a stage fails. `upload_now`
//! (SIGUSR1 in the binary) seals every open batch ahead of the schedule.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::buffer::{DiskUsage, LogStarts, Worker};
use crate::commit::{Assignments, MetadataCheck};
use crate::config::{Config, UncommittedStart};
use crate::consume::backpressure::Backpressure;
use crate::consume::replay_rules::RulesSource;
use crate::consume::{create_consumer, ArchiverContext, ConsumeError, PollLoop};
use crate::kafka_client::Auth;
use crate::metrics::Metrics;
use crate::pipeline::{BufferError, Fatal, QueuedRecords};
use crate::rules::{rules_key, CuttingRules};
use crate::schedule::{Cadence, Schedule, SystemClock, UploadNow};
use crate::suppress::{list_key, CurrentList};
use crate::upload::s3::S3Store;
use crate::upload::suppression::Follower;
use crate::upload::{archive_end, planned_files, Uploader};

/// Commands a buffer worker may have queued before the poll loop blocks on it. A command holds a
/// poll round of one partition (up to 1000 records, about a megabyte of typical events). The one
/// poll thread feeds every worker, so while it waits on a full queue the other workers can only
/// eat what they have queued: 8 left them idle a third of the time, 48 keeps both cores busy
/// for about 100 MB of queued records in all (`scripts/bench.sh`).
const WORKER_QUEUE: usize = 48;

/// Bytes of records queued for the buffer workers, at most: the count of commands above bounds
/// them only for typical events, and a producer decides how large events are (1 MB events
/// would make those 48 commands gigabytes). Half the 64 MiB it was, which read as fast, the
/// other half given to staging (`buffer::STAGING_BUDGET_BYTES`), where it saves CPU; at 16 MiB
/// the workers starved and reading took a fifth longer.
const QUEUED_RECORD_BYTES: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::ServeError),
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error("buffer worker failed: {0}")]
    Worker(String),
    #[error("cannot read the suppression requests in the bucket (the member needs s3:ListBucket and s3:GetObject on the prefix): {0}")]
    Suppression(crate::upload::s3::S3Error),
}

/// Runs the archiver until `shutdown` fires or a stage fails.
pub async fn run(
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
    upload_now: Arc<UploadNow>,
) -> Result<(), AppError> {
    let config = Arc::new(config);
    let data_dir = config.buffer.data_dir.clone();
    let dir = data_dir.clone();
    let private = tokio::task::spawn_blocking(move || crate::layout::prepare_data_dir(&dir))
        .await
        .map_err(|err| AppError::DataDir {
            path: data_dir.clone(),
            source: std::io::Error::other(err.to_string()),
        })?
        .map_err(|source| AppError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    if !private {
        tracing::warn!(
            path = %data_dir.display(),
            "cannot make the data directory private (0700): it is not this user's; its files are still 0600"
        );
    }

    let checks = crate::check::preflight(&config).await?;
    for result in &checks {
        tracing::info!(check = result.name, detail = %result.detail, ok = result.ok(), "start-up check");
    }
    let server_stop = CancellationToken::new();
    let server = if config.metrics.listen.is_empty() {
        None
    } else {
        Some(
            crate::metrics::serve(metrics.clone(), &config.metrics.listen, server_stop.clone())
                .await?,
        )
    };
    let store = S3Store::connect(&config.s3).await;
    // The suppression list is known before anything is consumed: a restart never cuts a batch
    // without the list the member had.
    let suppression = Arc::new(CurrentList::default());
    let mut follower = Follower::new(
        store.clone(),
        &config.s3.prefix,
        CuttingRules::of(&config),
        Arc::clone(&suppression),
        metrics.clone(),
    );
    match follower.first_refresh(&shutdown).await {
        Ok(true) => {}
        Ok(false) => {
            server_stop.cancel();
            return Ok(());
        }
        Err(err) => {
            server_stop.cancel();
            return Err(AppError::Suppression(err));
        }
    }
    let follower_stop = CancellationToken::new();
    let follower = tokio::spawn(follower.run(
        Duration::from_secs(config.suppression.refresh_secs),
        follower_stop.clone(),
    ));
    let assignments = Arc::new(Assignments::default());
    let disk = Arc::new(DiskUsage::default());
    let fatal = Arc::new(Fatal::default());
    let (upload_tx, upload_rx) = tokio::sync::mpsc::unbounded_channel();
    let (commit_tx, commit_rx) = std::sync::mpsc::channel();

    let log_starts = log_starts(&config);
    let worker_count = config.worker_count();
    let mut worker_txs = Vec::with_capacity(worker_count);
    let mut worker_threads = Vec::with_capacity(worker_count);
    let queued = Arc::new(QueuedRecords::new(QUEUED_RECORD_BYTES));
    for index in 0..worker_count {
        let (tx, rx) = sync_channel(WORKER_QUEUE);
        let worker = Worker::new(
            Arc::clone(&config),
            worker_count,
            upload_tx.clone(),
            metrics.clone(),
            Arc::clone(&disk),
            Arc::clone(&log_starts),
        )
        .with_suppression(Arc::clone(&suppression));
        let (fatal, queued) = (Arc::clone(&fatal), Arc::clone(&queued));
        let thread = std::thread::Builder::new()
            .name(format!("buffer-{index}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.run(rx, &queued)
                }))
                .unwrap_or(Err(BufferError::Panicked));
                if let Err(err) = &result {
                    fatal.raise(err.to_string());
                }
                result.map_err(|e| e.to_string())
            })
            .expect("spawn buffer worker");
        worker_txs.push(tx);
        worker_threads.push(thread);
    }
    drop(upload_tx);

    let uploader_stop = CancellationToken::new();
    let uploader = tokio::spawn(
        Uploader {
            store: store.clone(),
            prefix: config.s3.prefix.clone(),
            assignments: Arc::clone(&assignments),
            commits: commit_tx.clone(),
            metrics: metrics.clone(),
            concurrency: config.s3.concurrency,
            initial_backoff: Duration::from_millis(config.s3.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(config.s3.retry_max_backoff_ms),
            rules: CuttingRules::of(&config),
            jitter_seed: fastrand::u64(..),
        }
        .run(upload_rx, uploader_stop.clone()),
    );

    let context = ArchiverContext::new(
        config.kafka.topic.clone(),
        worker_txs.clone(),
        commit_tx,
        Arc::clone(&assignments),
        metrics.clone(),
        Arc::clone(&fatal),
    );
    let context = match config.kafka.uncommitted_start {
        UncommittedStart::Bucket => {
            let (store, runtime) = (store.clone(), tokio::runtime::Handle::current());
            let (prefix, topic) = (config.s3.prefix.clone(), config.kafka.topic.clone());
            context.with_bucket_position(Box::new(move |partition| {
                on_poll_thread(&runtime, archive_end(&store, &prefix, &topic, partition))
            }))
        }
        UncommittedStart::Reset => context,
    };
    let context = {
        let (store, runtime) = (store.clone(), tokio::runtime::Handle::current());
        let prefix = config.s3.prefix.clone();
        let fetch = {
            let (store, runtime, prefix) = (store.clone(), runtime.clone(), prefix.clone());
            Box::new(move |hash: &str| {
                on_poll_thread(&runtime, store.get_bytes(&rules_key(&prefix, hash)))
            })
        };
        let fetch_list = Box::new(move |hash: &str| {
            on_poll_thread(&runtime, store.get_bytes(&list_key(&prefix, hash)))
        });
        context.with_rules_source(RulesSource::new(&config, fetch).with_lists(fetch_list))
    };
    let context = {
        let (store, runtime) = (store.clone(), tokio::runtime::Handle::current());
        let (prefix, topic) = (config.s3.prefix.clone(), config.kafka.topic.clone());
        context.with_kept_intents(Box::new(move |partition, intent| {
            on_poll_thread(
                &runtime,
                planned_files(&store, &prefix, &topic, partition, intent),
            )
        }))
    };
    let context = context.with_auth(Auth::for_config(&config.kafka));
    let consumer = create_consumer(&config, context)?;
    let poll_loop = PollLoop {
        consumer,
        topic: config.kafka.topic.clone(),
        workers: worker_txs,
        queued,
        commits: commit_rx,
        assignments,
        disk,
        backpressure: Backpressure::new(config.buffer.max_disk_bytes),
        cadence: Cadence::new(
            Schedule::new(config.schedule.interval_secs, config.schedule.offset_secs),
            Arc::new(SystemClock),
            upload_now,
            Duration::from_secs(config.buffer.checkpoint_interval_secs),
            std::time::Instant::now(),
        ),
        metadata: MetadataCheck::new(config.kafka.exactly_once),
        metrics: metrics.clone(),
        fatal: Arc::clone(&fatal),
        shutdown: shutdown.clone(),
        grace: Duration::from_secs(config.shutdown.grace_secs),
    };
    // A fatal error anywhere must also stop the poll loop.
    let watcher = {
        let fatal = Arc::clone(&fatal);
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = fatal.raised() => {
                    *metrics.health.fatal.lock().expect("fatal lock") = fatal.get();
                    shutdown.cancel();
                }
            }
        })
    };
    // Dropping the loop at the end closes the consumer and the workers' channels. A thread of
    // its own, named, rather than the blocking pool: its CPU shows apart in `top -H` and /proc.
    let (poll_done, poll_finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || {
            let _ = poll_done.send(poll_loop.run());
        })
        .expect("spawn poll thread");
    let poll_result = poll_finished.await.expect("poll loop thread panicked");
    tracing::info!("kafka consumer closed; stopping the uploads");

    uploader_stop.cancel();
    follower_stop.cancel();
    let _ = uploader.await;
    let _ = follower.await;
    tracing::info!("uploads stopped");
    server_stop.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    watcher.abort();
    let worker_results = tokio::task::spawn_blocking(move || {
        worker_threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("buffer worker panicked".into()))
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("join buffer workers");
    poll_result?;
    for result in worker_results {
        result.map_err(AppError::Worker)?;
    }
    tracing::info!(
        records_consumed = metrics.records_consumed.get(),
        records_written = metrics.records_written.get(),
        "archiver stopped"
    );
    Ok(())
}

/// Runs an S3 lookup to its end for the rebalance callback, which runs on the poll thread (a
/// plain thread, where waiting is allowed, unlike on the async executor's).
fn on_poll_thread<T>(
    runtime: &tokio::runtime::Handle,
    lookup: impl std::future::Future<Output = Result<T, crate::upload::s3::S3Error>>,
) -> Result<T, String> {
    runtime.block_on(lookup).map_err(|err| err.to_string())
}

/// The buffer workers' view of where each partition's log starts: a client of its own that
/// never joins the group, made when a worker first asks (most runs never see a gap).
fn log_starts(config: &Config) -> LogStarts {
    use rdkafka::consumer::Consumer as _;
    let kafka = config.kafka.clone();
    let inspector = std::sync::OnceLock::new();
    Arc::new(move |partition| {
        let inspector = inspector
            .get_or_init(|| crate::kafka_client::inspector(&kafka).map_err(|err| err.to_string()));
        let answer = match inspector {
            Ok(inspector) => inspector
                .fetch_watermarks(&kafka.topic, partition, Duration::from_secs(10))
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.clone()),
        };
        match answer {
            Ok((low, _)) if low >= 0 => Some(low),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(partition, %error, "cannot read the log's first offset");
                None
            }
        }
    })
}
