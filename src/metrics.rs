//! Metrics: every Prometheus series the archiver exports is named here, in one place, with
//! bounded labels (partition numbers, a closed set of reasons and error kinds).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::route::DeadLetterReason;

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
    pub upload_bytes: IntCounter,
    pub upload_duration: Histogram,
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
    pub oldest_unuploaded_age: IntGaugeVec,
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
        let upload_duration = Histogram::with_opts(
            HistogramOpts::new(
                "upload_duration_seconds",
                "Time to put one object in S3, retries included",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(upload_duration.clone()))
            .expect("unique metric");

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
            upload_bytes: counter("upload_bytes_total", "Compressed bytes put in S3"),
            upload_duration,
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
            oldest_unuploaded_age: gauge_vec(
                "oldest_unuploaded_record_age_seconds",
                "Age of the oldest record read but not yet in S3, by partition",
                &["partition"],
            ),
            registry,
        };
        for reason in DeadLetterReason::ALL {
            metrics
                .records_dead_lettered
                .with_label_values(&[reason.as_str()]);
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(process));
        }
        metrics
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
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
