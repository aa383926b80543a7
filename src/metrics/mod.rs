//! Metrics and health: every Prometheus series the archiver exports is named here, in one
//! place, with bounded labels (partition numbers, a closed set of reasons and error kinds), and
//! the small HTTP server that exposes them with `/healthz` and `/readyz`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::route::DeadLetterReason;

pub mod events;

/// Handles to every series; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub records_consumed: IntCounter,
    pub bytes_consumed: IntCounter,
    /// Records appended to a local file (events and dead letters).
    pub records_written: IntCounter,
    pub bytes_written: IntCounter,
    pub records_dead_lettered: IntCounterVec,
    /// Records of suppressed users, left out of the archive (`suppress`).
    pub records_suppressed: IntCounter,
    /// Ids on the suppression list this member cuts new batches with.
    pub suppression_ids: IntGauge,
    /// Records read again from Kafka because a resume could not start where reading stopped.
    pub records_skipped_redelivered: IntCounter,
    pub buffered_bytes: IntGauge,
    pub open_files: IntGauge,
    pub open_compressors: IntGauge,
    pub batches_sealed: IntCounterVec,
    pub batches_uploaded: IntCounter,
    pub batches_replayed: IntCounter,
    pub exactly_once_degraded: IntGauge,
    pub objects_uploaded: IntCounter,
    pub objects_already_present: IntCounter,
    pub offset_resets: IntCounter,
    pub consume_errors: IntCounterVec,
    pub partitions_held: IntGauge,
    /// Keys an upload waits on because an object with other lines holds them (readiness off).
    pub object_conflicts: IntGauge,
    pub offsets_without_record: IntCounterVec,
    pub upload_bytes: IntCounter,
    pub upload_duration: Histogram,
    /// How long sealing a partition's batch takes (every file finished and fsynced): the part of
    /// the upload tail before the first PUT, which the PUTs' own timing cannot show.
    pub seal_duration: Histogram,
    pub upload_errors: IntCounterVec,
    pub upload_retries: IntCounter,
    pub uploads_in_flight: IntGauge,
    pub commits: IntCounter,
    pub commit_errors: IntCounter,
    pub partitions_resumed: IntCounterVec,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub paused_partitions: IntGauge,
    pub last_upload_timestamp: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub committed_lag: IntGaugeVec,
    /// How far retention is from records not yet archived; with `high_watermark`'s rate, how
    /// long until it deletes them (the `ArchiverRetentionHeadroomLow` alert).
    pub retention_headroom: IntGaugeVec,
    pub high_watermark: IntGaugeVec,
    pub oldest_unuploaded_age: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// Liveness and readiness inputs, shared with the stages that know them.
    pub health: Arc<Health>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("archiver".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let upload_duration = histogram(
            "upload_duration_seconds",
            "Time to put one object in S3, retries included",
            vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ],
        );
        let seal_duration = histogram(
            "seal_duration_seconds",
            "Time to seal one partition's batch: every file finished and fsynced, the checkpoint written",
            vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        );

        let metrics = Metrics {
            records_consumed: counter("records_consumed_total", "Records read from Kafka"),
            bytes_consumed: counter("bytes_consumed_total", "Payload bytes read from Kafka"),
            records_written: counter(
                "records_written_total",
                "Records appended to local batch files",
            ),
            bytes_written: counter(
                "bytes_written_total",
                "Uncompressed bytes appended to local batch files",
            ),
            records_dead_lettered: counter_vec(
                "records_dead_lettered_total",
                "Records sent to the dead letter, by reason",
                &["reason"],
            ),
            records_suppressed: counter(
                "records_suppressed_total",
                "Records of suppressed users left out of the archive",
            ),
            suppression_ids: gauge(
                "suppression_ids",
                "Ids on the suppression list new batches are cut with",
            ),
            records_skipped_redelivered: counter(
                "records_skipped_redelivered_total",
                "Records Kafka delivered again below the resume offset, ignored",
            ),
            buffered_bytes: gauge(
                "buffered_bytes",
                "Compressed bytes on the local volume, open and sealed batches",
            ),
            open_files: gauge("open_files", "Local batch files of open batches"),
            open_compressors: gauge(
                "open_compressors",
                "Files holding a live compressor (the rest are flushed and closed)",
            ),
            batches_sealed: counter_vec(
                "batches_sealed_total",
                "Batches closed for upload, by trigger",
                &["trigger"],
            ),
            batches_uploaded: counter(
                "batches_uploaded_total",
                "Batches whose every object is in S3",
            ),
            batches_replayed: counter(
                "batches_replayed_total",
                "Batches replayed from a recorded intent after an interrupted upload",
            ),
            exactly_once_degraded: gauge(
                "exactly_once_degraded",
                "1 when the broker drops commit metadata and the archive runs at-least-once",
            ),
            objects_uploaded: counter("objects_uploaded_total", "Objects put in S3"),
            partitions_held: gauge(
                "partitions_held",
                "Assigned partitions this member does not read: their interrupted batch was cut under rules it cannot reproduce (see the log)",
            ),
            object_conflicts: gauge(
                "object_conflicts",
                "Keys an upload waits on because an object with other lines holds them, never replaced (see the log and /readyz)",
            ),
            consume_errors: counter_vec(
                "consume_errors_total",
                "Errors the kafka consumer reported, by kind (a permanent one stops the archiver)",
                &["kind"],
            ),
            offset_resets: counter(
                "offset_resets_total",
                "Assignments that had to read past a range Kafka deleted before it was archived",
            ),
            offsets_without_record: counter_vec(
                "offsets_without_record_total",
                "Offsets of sealed batches that hold no record: deleted before archiving, or none (compaction, transaction markers)",
                &["cause"],
            ),
            objects_already_present: counter(
                "objects_already_present_total",
                "Objects of replayed or retried batches found in S3 with the same lines, not rewritten",
            ),
            upload_bytes: counter("upload_bytes_total", "Compressed bytes put in S3"),
            upload_duration,
            seal_duration,
            upload_errors: counter_vec(
                "upload_errors_total",
                "Failed S3 requests, by kind",
                &["kind"],
            ),
            upload_retries: counter("upload_retries_total", "S3 requests retried"),
            uploads_in_flight: gauge("uploads_in_flight", "Batches being uploaded"),
            commits: counter("commits_total", "Offsets committed to the group"),
            commit_errors: counter("commit_errors_total", "Offset commits that failed"),
            partitions_resumed: counter_vec(
                "partitions_resumed_total",
                "Partition assignments, by where reading resumed",
                &["from"],
            ),
            rebalances: counter_vec("rebalances_total", "Rebalance events, by kind", &["kind"]),
            assigned_partitions: gauge("assigned_partitions", "Partitions assigned to this member"),
            paused_partitions: gauge(
                "paused_partitions",
                "Partitions paused because the local disk budget is used up",
            ),
            last_upload_timestamp: gauge(
                "last_upload_timestamp_seconds",
                "Unix time of the last batch fully uploaded",
            ),
            consumer_lag: gauge_vec(
                "consumer_lag_records",
                "High watermark minus the position read, by partition",
                &["partition"],
            ),
            committed_lag: gauge_vec(
                "consumer_committed_lag_records",
                "High watermark minus the committed offset, by partition",
                &["partition"],
            ),
            retention_headroom: gauge_vec(
                "retention_headroom_records",
                "Committed offset minus the log's first offset, by partition: records retention \
                 deletes before it reaches unarchived ones (negative: it already did)",
                &["partition"],
            ),
            high_watermark: gauge_vec(
                "partition_high_watermark",
                "The partition's high watermark, by partition: its rate is the produce rate",
                &["partition"],
            ),
            oldest_unuploaded_age: gauge_vec(
                "oldest_unuploaded_record_age_seconds",
                "Age of the oldest record read but not yet in S3, by partition (0 when none)",
                &["partition"],
            ),
            build_info: gauge_vec(
                "build_info",
                "Always 1; the version label says which build runs",
                &["version"],
            ),
            health: Arc::new(Health::default()),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every label value exists from the start, so dashboards and alerts see zeros rather
        // than missing series.
        for reason in DeadLetterReason::ALL {
            metrics
                .records_dead_lettered
                .with_label_values(&[reason.as_str()]);
        }
        for kind in ["transient", "permanent"] {
            metrics.upload_errors.with_label_values(&[kind]);
        }
        for kind in ["assign", "revoke", "error"] {
            metrics.rebalances.with_label_values(&[kind]);
        }
        for trigger in [
            "schedule",
            "requested",
            "batch-size",
            "disk-pressure",
            "replay",
        ] {
            metrics.batches_sealed.with_label_values(&[trigger]);
        }
        for from in ["checkpoint", "committed"] {
            metrics.partitions_resumed.with_label_values(&[from]);
        }
        for kind in ["transient", "permanent"] {
            metrics.consume_errors.with_label_values(&[kind]);
        }
        for cause in ["deleted", "no-record", "suppressed"] {
            metrics.offsets_without_record.with_label_values(&[cause]);
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(process));
        }
        metrics
    }

    /// Drops the lag series of a partition this member no longer owns. (Its oldest pending
    /// record is forgotten by the buffer worker that owned it.)
    pub fn forget_partition(&self, partition: i32) {
        let label = partition.to_string();
        let _ = self.consumer_lag.remove_label_values(&[&label]);
        let _ = self.committed_lag.remove_label_values(&[&label]);
        let _ = self.retention_headroom.remove_label_values(&[&label]);
        let _ = self.high_watermark.remove_label_values(&[&label]);
    }

    /// The text exposition of every series, ages computed as of now.
    pub fn render(&self) -> String {
        let now_ms = chrono::Utc::now().timestamp_millis();
        // Rebuilt from the owned partitions at every scrape, so revoked ones disappear.
        self.oldest_unuploaded_age.reset();
        for (partition, oldest) in self.health.oldest_pending_ms.lock().expect("lock").iter() {
            let age = oldest.map_or(0, |since| ((now_ms - since) / 1000).max(0));
            self.oldest_unuploaded_age
                .with_label_values(&[&partition.to_string()])
                .set(age);
        }
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What `/healthz` and `/readyz` answer from.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix ms of the poll loop's last round: a stuck loop is not alive.
    pub last_poll_ms: AtomicI64,
    /// Unix ms of the last "all brokers down" report, 0 if none.
    pub brokers_down_since_ms: AtomicI64,
    /// Set while S3 requests keep failing (three attempts in a row), cleared by a success.
    pub s3_failing: AtomicBool,
    /// Per assigned partition: Unix ms of the oldest record read but not yet in S3.
    pub oldest_pending_ms: Mutex<HashMap<i32, Option<i64>>>,
    /// Why the process is stopping on an error it cannot get past; never ready again.
    pub fatal: Mutex<Option<String>>,
    /// Keys an upload waits on because an object with other lines holds them: the batch cannot
    /// go up (nor its offsets be committed) until an operator moves the object away.
    pub conflicting_keys: Mutex<BTreeSet<String>>,
}

/// How long the poll loop may go without a round before the process counts as stuck.
const POLL_STALL_MS: i64 = 120_000;

impl Health {
    fn now_ms() -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    pub fn polled(&self) {
        self.last_poll_ms.store(Self::now_ms(), Ordering::Relaxed);
    }

    /// Alive: the poll loop turns (or has not started yet).
    pub fn alive(&self) -> Result<(), String> {
        let last = self.last_poll_ms.load(Ordering::Relaxed);
        if last > 0 && Self::now_ms() - last > POLL_STALL_MS {
            return Err(format!(
                "the kafka poll loop has not run for {}s",
                (Self::now_ms() - last) / 1000
            ));
        }
        Ok(())
    }

    /// Ready: alive, the brokers reachable, S3 accepting uploads.
    pub fn ready(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(fatal) = self.fatal.lock().expect("fatal lock").as_ref() {
            problems.push(format!("stopping: {fatal}"));
        }
        if let Err(problem) = self.alive() {
            problems.push(problem);
        }
        if self.last_poll_ms.load(Ordering::Relaxed) == 0 {
            problems.push("not consuming yet".to_string());
        }
        if self.brokers_down_since_ms.load(Ordering::Relaxed) > 0 {
            problems.push("no kafka broker reachable".to_string());
        }
        if self.s3_failing.load(Ordering::Relaxed) {
            problems.push("s3 uploads are failing".to_string());
        }
        for key in self.conflicting_keys.lock().expect("conflicts lock").iter() {
            problems.push(format!(
                "an object with other lines holds {key}: not replacing it; the upload waits until it is moved away"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address}: {source}")]
pub struct ServeError {
    address: String,
    source: std::io::Error,
}

/// Binds the metrics address now (so a taken port fails the start), then serves `/metrics`,
/// `/healthz` and `/readyz` until `stop` fires.
pub async fn serve(
    metrics: Metrics,
    address: &str,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ServeError {
            address: address.to_string(),
            source,
        })?;
    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(serve_on(
        listener,
        metrics,
        ServeLimits::default(),
        stop,
    )))
}

/// What clients may take of the metrics server.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; a scraper and the kubelet's probes need a handful.
    pub max_connections: usize,
    /// From accept to the last byte written, reading and writing included: a client that
    /// trickles its request or reads the answer slowly holds its slot no longer than this.
    pub request_deadline: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 32,
            request_deadline: Duration::from_secs(10),
        }
    }
}

/// Serves until `stop` fires. Anyone who reaches the port is a client (the NetworkPolicy in
/// `deploy/` admits only the scraper), so none may hold more than `limits` allow: connections past
/// the cap are closed at once, each request is cut off at its deadline however slowly it trickles,
/// and a failing `accept` (file descriptors exhausted) backs off instead of spinning.
async fn serve_on(
    listener: TcpListener,
    metrics: Metrics,
    limits: ServeLimits,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut accept_backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match stream {
            Ok((stream, _)) => {
                accept_backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?accept_backoff, "metrics server cannot accept a connection");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(accept_backoff) => {}
                }
                accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // Dropped at once when every slot is taken: closing is cheaper than queueing.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limits.request_deadline, answer(stream, &metrics)).await;
            drop(slot);
        });
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Reads one request head (the request line is all it needs) and writes the answer.
async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) {
    let mut request = vec![0u8; 4096];
    let mut read = 0;
    while read < request.len() {
        match stream.read(&mut request[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
        if request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request[..read]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = respond(metrics, path);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn respond(metrics: &Metrics, path: &str) -> (&'static str, &'static str, String) {
    match path.split('?').next().unwrap_or(path) {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => match metrics.health.alive() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
            Err(problem) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{problem}\n"),
            ),
        },
        "/readyz" => match metrics.health.ready() {
            Ok(()) => (
                "200 OK",
                "text/plain",
                format!(
                    "ready: {} partitions assigned\n",
                    metrics.assigned_partitions.get()
                ),
            ),
            Err(problems) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {}\n", problems.join("; ")),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_reason() {
        let metrics = Metrics::new();
        let health = &metrics.health;
        assert_eq!(respond(&metrics, "/healthz").0, "200 OK");
        assert!(health
            .ready()
            .unwrap_err()
            .contains(&"not consuming yet".to_string()));
        health.polled();
        assert_eq!(health.ready(), Ok(()));
        health.s3_failing.store(true, Ordering::Relaxed);
        health.brokers_down_since_ms.store(1, Ordering::Relaxed);
        let (status, _, body) = respond(&metrics, "/readyz");
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("no kafka broker reachable") && body.contains("s3 uploads are failing"),
            "{body}"
        );
        *health.fatal.lock().unwrap() = Some("fatal kafka error (FencedInstanceId)".into());
        let (_, _, body) = respond(&metrics, "/readyz");
        assert!(
            body.contains("stopping: fatal kafka error (FencedInstanceId)"),
            "{body}"
        );
        health
            .conflicting_keys
            .lock()
            .unwrap()
            .insert("segment-logs/s/d/t-0-1.gz".into());
        let (_, _, body) = respond(&metrics, "/readyz");
        assert!(
            body.contains("an object with other lines holds segment-logs/s/d/t-0-1.gz"),
            "{body}"
        );
        // A poll loop that stopped turning is not alive.
        health
            .last_poll_ms
            .store(Health::now_ms() - POLL_STALL_MS - 1000, Ordering::Relaxed);
        assert_eq!(respond(&metrics, "/healthz").0, "503 Service Unavailable");
    }

    async fn serving(limits: ServeLimits) -> (std::net::SocketAddr, CancellationToken) {
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, Metrics::new(), limits, stop.clone()));
        (address, stop)
    }

    /// Whether the server closed `stream` within `within` (a read answers end of file or an
    /// error), sending a byte every 100 ms meanwhile as a trickling client does.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut byte = [0u8; 1];
        while tokio::time::Instant::now() < deadline {
            if stream.write_all(b"G").await.is_err() {
                return true;
            }
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) | Err(_) => {}
            }
        }
        false
    }

    #[tokio::test]
    async fn a_trickling_client_is_cut_off_at_the_request_deadline() {
        let (address, stop) = serving(ServeLimits {
            request_deadline: Duration::from_millis(500),
            ..ServeLimits::default()
        })
        .await;
        let mut trickler = tokio::net::TcpStream::connect(address).await.unwrap();
        assert!(
            closed_within(&mut trickler, Duration::from_secs(3)).await,
            "a client sending a byte every 100 ms held its connection past the deadline"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_the_scrape_after_them_answered() {
        let (address, stop) = serving(ServeLimits {
            max_connections: 4,
            request_deadline: Duration::from_secs(5),
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Give the server time to take the four in.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fifth = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), fifth.read_to_end(&mut rest))
            .await
            .is_ok();
        assert!(closed, "a connection past the cap was held");
        // Their slots come back as they go (or at the deadline), and the scraper gets its answer.
        drop(idle);
        let mut scraper = tokio::net::TcpStream::connect(address).await.unwrap();
        scraper
            .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        scraper.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        stop.cancel();
    }

    #[test]
    fn the_oldest_record_age_is_computed_at_scrape_time() {
        let metrics = Metrics::new();
        {
            let mut oldest = metrics.health.oldest_pending_ms.lock().unwrap();
            oldest.insert(3, Some(Health::now_ms() - 90_000));
            oldest.insert(4, None);
        }
        let text = metrics.render();
        let age = |partition: &str| -> i64 {
            let prefix = format!(
                "archiver_oldest_unuploaded_record_age_seconds{{partition=\"{partition}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no age for {partition}:\n{text}"))
                .parse()
                .unwrap()
        };
        assert!((89..=91).contains(&age("3")));
        assert_eq!(age("4"), 0);
        assert_eq!(respond(&metrics, "/nope").0, "404 Not Found");
    }
}
