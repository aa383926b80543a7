//! Typed configuration: a TOML file, overridden by `ARCHIVER_{SECTION}_{KEY}` environment variables
//! and `--set section.key=value` flags, then validated as a whole so that a bad configuration
//! fails at start with one message listing every problem.
//!
//! Credentials are deliberately absent: they come from the AWS SDK's default chain and from
//! librdkafka properties the operator passes through `kafka.properties`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{Codec, DayFormat, SourceRule};

/// Everything the archiver needs to run; one struct per stage of the data path.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub routing: RoutingConfig,
    pub buffer: BufferConfig,
    pub schedule: ScheduleConfig,
    pub shutdown: ShutdownConfig,
    pub metrics: MetricsConfig,
    pub output: OutputConfig,
    pub suppression: SuppressionConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers, as librdkafka takes them.
    pub brokers: String,
    /// The one topic of raw events this group archives.
    pub topic: String,
    /// Consumer group: offsets committed here are the archive's progress.
    pub group_id: String,
    /// Static membership (`group.instance.id`): a pod restart within the session timeout keeps
    /// its partitions, so a rolling restart does not throw away an hour of buffered batches.
    /// Empty means dynamic membership.
    pub group_instance_id: String,
    /// How long the group waits for a silent member before moving its partitions.
    pub session_timeout_ms: u32,
    /// `required`: stop with an error if the broker drops offset-commit metadata, where batch
    /// intents live; `best-effort`: run at-least-once on such a broker, with a warning and a
    /// metric.
    pub exactly_once: ExactlyOnce,
    /// Where a partition the group never committed starts. `bucket`: after the newest batch
    /// manifest the bucket holds for it (a new `group.id` or expired offsets do not archive the
    /// retained log a second time), or from the log's start when it holds none; `reset`:
    /// always from the log's start (`auto.offset.reset` is `earliest`, nothing else).
    pub uncommitted_start: UncommittedStart,
    /// `aws-msk-iam`: SASL OAUTHBEARER with AWS MSK IAM tokens, signed with the credentials of
    /// the SDK's default chain (the same as S3's: IRSA on EKS); `none`: whatever
    /// `kafka.properties` sets up.
    pub auth: KafkaAuth,
    /// Region of the MSK cluster, for `aws-msk-iam`; empty means `s3.region`.
    pub aws_region: String,
    /// Passed to librdkafka unchanged (security.protocol, sasl.*, ssl.*, fetch tuning).
    /// The archiver's own settings (auto commit off, assignment strategy) cannot be overridden.
    /// Booleans and numbers are taken as librdkafka spells them (`false`, `5000`).
    #[serde(deserialize_with = "scalars_as_strings")]
    pub properties: BTreeMap<String, String>,
    /// Properties read from files at start (one trailing newline dropped): a Secret mounted
    /// as a volume, so passwords never sit in the ConfigMap, a flag or the pod spec.
    /// `ARCHIVER_KAFKA_PROPERTY_{NAME}` variables (`SASL_PASSWORD` is `sasl.password`) are the
    /// other way in, for `secretKeyRef`.
    pub property_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "segment-events".into(),
            group_id: "kafka-s3-archiver".into(),
            group_instance_id: String::new(),
            session_timeout_ms: 45_000,
            exactly_once: ExactlyOnce::Required,
            uncommitted_start: UncommittedStart::Bucket,
            auth: KafkaAuth::None,
            aws_region: String::new(),
            properties: BTreeMap::new(),
            property_files: BTreeMap::new(),
        }
    }
}

/// librdkafka takes every property as a string; a flag or a file that writes `false` or `5000`
/// means the same.
fn scalars_as_strings<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Flag(bool),
        Integer(i64),
        Float(f64),
    }
    let map = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Scalar::Text(text) => text,
                Scalar::Flag(flag) => flag.to_string(),
                Scalar::Integer(number) => number.to_string(),
                Scalar::Float(number) => number.to_string(),
            };
            (key, value)
        })
        .collect())
}

/// How the Kafka clients authenticate, beyond what `kafka.properties` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaAuth {
    None,
    /// AWS MSK with IAM access control.
    AwsMskIam,
}

/// What to do on a broker that cannot carry the exactly-once protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExactlyOnce {
    Required,
    BestEffort,
}

/// Where a partition without a committed offset starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UncommittedStart {
    /// After the newest manifest in the bucket: the bucket is the source of truth.
    Bucket,
    /// From the log's start (librdkafka's `auto.offset.reset`, which must be `earliest`).
    Reset,
}

/// How objects are labelled for readers that honour `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentLabel {
    /// `Content-Type: text/plain` + `Content-Encoding: gzip`, as Segment writes its logs.
    Segment,
    /// `Content-Type: application/gzip`, so clients download the gzip bytes as they are.
    Gzip,
}

/// Which integrity checksum travels with each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    /// Each object's CRC32C, sent as a header and checked by S3 (the default for AWS).
    Crc32c,
    /// Content-MD5 header, for S3-compatible stores that check only MD5.
    ContentMd5,
}

/// An S3 object option with a fixed set of values, spelled as S3 spells them; the empty string
/// (the default) sends nothing, so the bucket's own default applies. Anything else is refused
/// at start with the values S3 takes.
macro_rules! s3_option {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            #[default]
            BucketDefault,
            $($variant,)+
        }

        impl $name {
            /// The value S3 takes, or `None` for the bucket's default.
            pub fn as_s3(self) -> Option<&'static str> {
                match self {
                    $name::BucketDefault => None,
                    $($name::$variant => Some($value),)+
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(value: String) -> Result<$name, String> {
                match value.as_str() {
                    "" => Ok($name::BucketDefault),
                    $($value => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {} (or \"\" for the bucket's default)",
                        [$($value),+].join(", ")
                    )),
                }
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.as_s3().unwrap_or_default().to_string()
            }
        }
    };
}

s3_option!(
    /// `x-amz-storage-class` of every object.
    StorageClass {
        Standard = "STANDARD",
        ReducedRedundancy = "REDUCED_REDUNDANCY",
        StandardIa = "STANDARD_IA",
        OnezoneIa = "ONEZONE_IA",
        IntelligentTiering = "INTELLIGENT_TIERING",
        Glacier = "GLACIER",
        GlacierIr = "GLACIER_IR",
        DeepArchive = "DEEP_ARCHIVE",
        ExpressOnezone = "EXPRESS_ONEZONE",
        Outposts = "OUTPOSTS",
        Snow = "SNOW",
    }
);

s3_option!(
    /// `x-amz-server-side-encryption` of every object.
    Encryption {
        Aes256 = "AES256",
        AwsKms = "aws:kms",
        AwsKmsDsse = "aws:kms:dsse",
    }
);

s3_option!(
    /// `x-amz-acl` of every object (a canned ACL).
    CannedAcl {
        Private = "private",
        PublicRead = "public-read",
        PublicReadWrite = "public-read-write",
        AuthenticatedRead = "authenticated-read",
        AwsExecRead = "aws-exec-read",
        BucketOwnerRead = "bucket-owner-read",
        BucketOwnerFullControl = "bucket-owner-full-control",
    }
);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Optional key prefix before `segment-logs/`, e.g. `team-a/`.
    pub prefix: String,
    pub region: String,
    /// Custom endpoint for S3-compatible stores (MinIO, Garage, moto); empty for AWS.
    pub endpoint_url: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    pub force_path_style: bool,
    pub content_label: ContentLabel,
    pub checksum: ChecksumMode,
    /// Puts objects with `If-None-Match: *`, so that rewriting a key (a replay, a zombie, a
    /// retried request) is noticed and an identical object left alone. Turn off for stores that
    /// reject the header; those that ignore it (Garage 2.5) are harmless.
    pub conditional_writes: bool,
    /// `STANDARD`, `STANDARD_IA`, `INTELLIGENT_TIERING`, ...; empty keeps the bucket default.
    pub storage_class: StorageClass,
    /// `AES256` (SSE-S3), `aws:kms` (SSE-KMS) or `aws:kms:dsse`; empty keeps the bucket default.
    pub server_side_encryption: Encryption,
    /// KMS key id or ARN for `aws:kms`.
    pub sse_kms_key_id: String,
    /// Canned ACL such as `bucket-owner-full-control` for cross-account buckets; empty sends
    /// none.
    pub acl: CannedAcl,
    /// Role to assume on top of the default credential chain; empty for none.
    pub assume_role_arn: String,
    /// External id required by the role's trust policy.
    pub assume_role_external_id: String,
    /// Objects at or above this size go up as multipart uploads.
    pub multipart_threshold_bytes: u64,
    /// Part size of multipart uploads (S3 requires at least 5 MiB). A part in flight is held in
    /// memory, so uploads hold at most `concurrency` × this.
    pub multipart_part_bytes: u64,
    /// Requests in flight at once across all partitions.
    pub concurrency: usize,
    /// First retry delay; doubles each attempt, with full jitter.
    pub retry_initial_backoff_ms: u64,
    /// Ceiling of the retry delay. Uploads retry forever: data never leaves the disk unacked.
    pub retry_max_backoff_ms: u64,
    /// Per-request timeout, so a stalled connection becomes a retry instead of a hang.
    pub request_timeout_secs: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: "segment-archive".into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint_url: String::new(),
            force_path_style: false,
            content_label: ContentLabel::Segment,
            checksum: ChecksumMode::Crc32c,
            conditional_writes: true,
            storage_class: StorageClass::BucketDefault,
            server_side_encryption: Encryption::BucketDefault,
            sse_kms_key_id: String::new(),
            acl: CannedAcl::BucketDefault,
            assume_role_arn: String::new(),
            assume_role_external_id: String::new(),
            multipart_threshold_bytes: 64 << 20,
            multipart_part_bytes: 16 << 20,
            concurrency: 8,
            retry_initial_backoff_ms: 200,
            retry_max_backoff_ms: 30_000,
            request_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Where the source id comes from, first match wins: `header:NAME`, `field:NAME`,
    /// `write-key:FIELD` (looked up in `write_keys`), `static:ID`.
    pub source: Vec<SourceRule>,
    /// `writeKey` → source id, for `write-key:` rules.
    pub write_keys: BTreeMap<String, String>,
    /// Top-level field holding the ISO-8601 time the event was received.
    pub received_at_field: String,
    /// Use the Kafka record timestamp when `receivedAt` is missing or unparsable, instead of
    /// dead-lettering the event.
    pub fallback_to_kafka_timestamp: bool,
    pub day_format: DayFormat,
    /// Messages larger than this are dead-lettered rather than archived.
    pub max_message_bytes: usize,
    /// Events nested deeper than this (objects and arrays) are dead-lettered: they are not
    /// analytics events, and downstream JSON readers refuse them.
    pub max_json_depth: usize,
    /// The source ids to archive; empty (the default) archives every well-formed one. Anyone
    /// who can produce to the topic picks the source id, and each new one is a folder and a
    /// file: events of a source not listed are dead letters (`source-not-allowed`). Left out
    /// of the cutting rules when empty, so rules (and their hash) stay those of releases
    /// before it.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub allowed_sources: BTreeSet<String>,
    /// How many days an event's `receivedAt` may lie before or after its Kafka timestamp; off
    /// (the default) when unset. A producer picks `receivedAt`, and each day is a folder and a
    /// file: events outside the window are dead letters (`received-at-outside-window`). Keep it
    /// off where old days are archived on purpose (`restore` backfilling a month). Records
    /// without a Kafka timestamp are not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_at_window_days: Option<u32>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            source: vec![
                SourceRule::Header("source-id".into()),
                SourceRule::Field("projectId".into()),
            ],
            write_keys: BTreeMap::new(),
            received_at_field: "receivedAt".into(),
            fallback_to_kafka_timestamp: false,
            day_format: DayFormat::EpochMs,
            max_message_bytes: 1 << 20,
            max_json_depth: 64,
            allowed_sources: BTreeSet::new(),
            received_at_window_days: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Local volume for batches and checkpoints; must survive container restarts to resume.
    pub data_dir: PathBuf,
    /// gzip level 1-9.
    pub compression_level: u32,
    /// A file is cut once it holds this many uncompressed bytes.
    pub max_file_bytes: u64,
    /// A partition's batch is sealed early once it holds this many uncompressed bytes.
    pub max_batch_bytes: u64,
    /// A partition's batch is sealed early once it holds this many files. A producer decides
    /// the source id and day of every record, so it can open a file per record; each file costs
    /// an inode, a checkpoint entry, memory while it uploads and a PUT. A replay is not cut by
    /// it: it opens the files its first attempt did.
    pub max_batch_files: usize,
    /// Local disk budget: above half of it batches are sealed early, at it partitions pause.
    pub max_disk_bytes: u64,
    /// Live compressors at once (each ~330 KB), each with its file's descriptor; colder files
    /// are sync-flushed, give their compressor back and only stage their next lines (the first
    /// 256 keep their descriptors). Files compress in chunks, so a few per core suffice: more
    /// only cost memory and cache (128 read faster than 512 in `scripts/bench.sh`, and 64 keeps
    /// the 12,800-file memory benchmark under 300 MB).
    pub max_open_compressors: usize,
    /// How often each partition's buffers are made durable and its checkpoint written.
    pub checkpoint_interval_secs: u64,
    /// Threads that route and compress; 0 means one per core.
    pub workers: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./archiver-data"),
            compression_level: 6,
            max_file_bytes: 256 << 20,
            max_batch_bytes: 1 << 30,
            max_batch_files: 1000,
            max_disk_bytes: 20 << 30,
            max_open_compressors: 64,
            checkpoint_interval_secs: 10,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Batches are sealed every `interval_secs`, aligned to UTC midnight plus `offset_secs`.
    pub interval_secs: u64,
    /// Default 2400 with an hourly interval: minute 40 of every hour, as Segment does.
    pub offset_secs: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval_secs: 3600,
            offset_secs: 2400,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time given to in-flight uploads and commits after SIGTERM; keep it below the pod's
    /// terminationGracePeriodSeconds. What is unfinished then is resumed or replayed later.
    pub grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_secs: 25 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuppressionConfig {
    /// How often each member reads the suppression requests in the bucket (`suppress`); a new
    /// list is taken up from each partition's next batch, so a request takes effect within about
    /// this long. The list is also read once before the member consumes anything.
    pub refresh_secs: u64,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        Self { refresh_secs: 30 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// `gzip`: one gzip member per object, `.gz`, as Segment writes them; `zstd`: one zstd
    /// frame per object, `.zst`, `Content-Type: application/zstd` (smaller, faster to read).
    pub compression: Codec,
    /// zstd level, 1-19, for `zstd` objects (gzip's level is `buffer.compression_level`).
    pub zstd_level: i32,
    /// Put, with every batch, an index of the user and anonymous ids each object holds (Bloom
    /// filters), so `forget` reads only the objects that may hold the ids it forgets.
    pub id_index: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            compression: Codec::Gzip,
            zstd_level: 3,
            id_index: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics`, `/healthz` and `/readyz` server; empty turns it off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9187".into(),
        }
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

const ENV_PREFIX: &str = "ARCHIVER_";
/// `ARCHIVER_KAFKA_PROPERTY_SASL_PASSWORD` sets `kafka.properties."sasl.password"`: librdkafka's
/// names are dotted lower case, which environment variable names cannot be.
const ENV_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";
/// Top-level tables of the config file, which `ARCHIVER_{SECTION}_{KEY}` variables address.
const SECTIONS: &[&str] = &[
    "kafka",
    "s3",
    "routing",
    "buffer",
    "schedule",
    "shutdown",
    "metrics",
    "output",
    "suppression",
];

impl Config {
    /// Reads `path` (if given), applies environment overrides and `--set` overrides, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut root = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(table) => table,
                    Err(err) => {
                        return Err(ConfigError {
                            problems: vec![format!("{}: {}", path.display(), err.message())],
                        })
                    }
                },
                Err(err) => {
                    return Err(ConfigError {
                        problems: vec![format!("cannot read {}: {err}", path.display())],
                    })
                }
            },
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if let Some(property) = rest.strip_prefix(ENV_PROPERTY_PREFIX) {
                // Taken as written, never as TOML: a secret is whatever bytes it is.
                let property = property.to_ascii_lowercase().replace('_', ".");
                properties_table(&mut root).insert(property, toml::Value::String(value));
                continue;
            }
            // Only variables naming a section are ours: Kubernetes injects `{SERVICE}_PORT` and
            // the like for every Service, and a Service named "archiver" must not break start-up.
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section.to_ascii_lowercase().as_str()) {
                continue;
            }
            set_path(
                &mut root,
                &[&section.to_ascii_lowercase(), &key.to_ascii_lowercase()],
                &value,
            );
        }
        for assignment in overrides {
            match assignment.split_once('=') {
                Some((path, value)) => match key_path(path.trim()) {
                    Ok(parts) => {
                        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                        set_path(&mut root, &parts, value.trim());
                    }
                    Err(problem) => problems.push(format!("--set {assignment}: {problem}")),
                },
                None => problems.push(format!("--set {assignment}: expected section.key=value")),
            }
        }
        let mut config = deserialize_collecting(root, &mut problems);
        if let Some(config) = &mut config {
            config.kafka.read_property_files(&mut problems);
            if config.kafka.aws_region.is_empty() {
                config.kafka.aws_region = config.s3.region.clone();
            }
            config.validate_into(&mut problems);
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError { problems }),
        }
    }

    /// Checks values serde cannot: ranges, relations between fields, rule syntax.
    fn validate_into(&self, problems: &mut Vec<String>) {
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        check(
            !self.kafka.brokers.trim().is_empty(),
            "kafka.brokers: must name at least one broker".into(),
        );
        check(
            is_valid_topic(&self.kafka.topic),
            format!(
                "kafka.topic: {:?} is not a valid topic name (1-249 of [a-zA-Z0-9._-])",
                self.kafka.topic
            ),
        );
        check(
            !self.kafka.group_id.is_empty(),
            "kafka.group_id: must not be empty".into(),
        );
        if self.kafka.auth == KafkaAuth::AwsMskIam {
            for key in ["sasl.mechanism", "sasl.mechanisms"] {
                if let Some(mechanism) = self.kafka.properties.get(key) {
                    check(
                        mechanism.eq_ignore_ascii_case("OAUTHBEARER"),
                        format!(
                            "kafka.properties.{key}: {mechanism:?} conflicts with kafka.auth = \"aws-msk-iam\", which authenticates with OAUTHBEARER"
                        ),
                    );
                }
            }
        }
        if let Some(reset) = self.kafka.properties.get("auto.offset.reset") {
            check(
                ["earliest", "smallest", "beginning"].contains(&reset.as_str()),
                format!(
                    "kafka.properties.auto.offset.reset: {reset:?} would skip records without a trace; \
                     the archiver resets to the log's start, where the jump is seen, reported and \
                     recorded as deleted (a group without offsets starts after the bucket's newest \
                     batch: kafka.uncommitted_start)"
                ),
            );
        }
        if let Some(level) = self.kafka.properties.get("isolation.level") {
            check(
                level == "read_committed",
                format!(
                    "kafka.properties.isolation.level: {level:?} would deliver aborted transactions; \
                     the archiver reads read_committed only, so that a replay is given exactly the \
                     records its first attempt was and cuts the same objects"
                ),
            );
        }
        for key in self.kafka.properties.keys() {
            check(
                !RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()),
                format!(
                    "kafka.properties.{key}: set by the archiver itself and cannot be overridden"
                ),
            );
        }
        check(
            (3..=63).contains(&self.s3.bucket.len()),
            format!("s3.bucket: {:?} must be 3 to 63 characters", self.s3.bucket),
        );
        check(
            self.s3.prefix.is_empty() || self.s3.prefix.ends_with('/'),
            format!("s3.prefix: {:?} must end with '/'", self.s3.prefix),
        );
        check(
            !self.s3.prefix.starts_with('/'),
            format!("s3.prefix: {:?} must not start with '/'", self.s3.prefix),
        );
        check(
            self.s3.endpoint_url.is_empty()
                || self.s3.endpoint_url.starts_with("http://")
                || self.s3.endpoint_url.starts_with("https://"),
            format!(
                "s3.endpoint_url: {:?} must start with http:// or https://",
                self.s3.endpoint_url
            ),
        );
        check(
            self.s3.multipart_part_bytes >= 5 << 20,
            "s3.multipart_part_bytes: S3 requires parts of at least 5 MiB (5242880)".into(),
        );
        check(
            self.s3.multipart_threshold_bytes >= self.s3.multipart_part_bytes,
            "s3.multipart_threshold_bytes: must be at least s3.multipart_part_bytes".into(),
        );
        check(
            self.s3.multipart_part_bytes <= S3_MAX_PUT_BYTES,
            "s3.multipart_part_bytes: S3 takes parts of at most 5 GiB (5368709120)".into(),
        );
        let largest_object = self.max_object_bytes();
        let largest_single_put =
            largest_object.min(self.s3.multipart_threshold_bytes.saturating_sub(1));
        check(
            largest_single_put <= S3_MAX_PUT_BYTES,
            format!(
                "buffer.max_file_bytes: a file can reach {largest_single_put} bytes below \
                 s3.multipart_threshold_bytes and go up in one PUT, but S3 takes at most 5 GiB in \
                 one PUT: lower s3.multipart_threshold_bytes to 5 GiB or less"
            ),
        );
        let parts = largest_object.div_ceil(self.s3.multipart_part_bytes.max(1));
        check(
            largest_object < self.s3.multipart_threshold_bytes || parts <= S3_MAX_PARTS,
            format!(
                "buffer.max_file_bytes: a file can reach {largest_object} bytes, {parts} parts of \
                 s3.multipart_part_bytes ({}), but S3 takes at most 10,000 parts: raise \
                 s3.multipart_part_bytes or lower buffer.max_file_bytes",
                self.s3.multipart_part_bytes
            ),
        );
        check(
            self.s3.concurrency >= 1,
            "s3.concurrency: must be at least 1".into(),
        );
        check(
            self.s3.retry_initial_backoff_ms >= 1
                && self.s3.retry_initial_backoff_ms <= self.s3.retry_max_backoff_ms,
            "s3.retry_initial_backoff_ms: must be at least 1 and at most s3.retry_max_backoff_ms"
                .into(),
        );
        check(
            (1..=19).contains(&self.output.zstd_level),
            format!(
                "output.zstd_level: {} must be 1 to 19",
                self.output.zstd_level
            ),
        );
        check(
            self.s3.request_timeout_secs >= 1,
            "s3.request_timeout_secs: must be at least 1".into(),
        );
        check(
            self.s3.sse_kms_key_id.is_empty()
                || matches!(
                    self.s3.server_side_encryption,
                    Encryption::AwsKms | Encryption::AwsKmsDsse
                ),
            "s3.sse_kms_key_id: needs s3.server_side_encryption = \"aws:kms\"".into(),
        );
        check(
            self.s3.assume_role_external_id.is_empty() || !self.s3.assume_role_arn.is_empty(),
            "s3.assume_role_external_id: needs s3.assume_role_arn".into(),
        );
        if self.routing.source.is_empty() {
            problems.push("routing.source: needs at least one rule".into());
        }
        for source in &self.routing.allowed_sources {
            if let Err(reason) = crate::layout::check_source_id(source) {
                problems.push(format!(
                    "routing.allowed_sources: source id {source:?} {reason}"
                ));
            }
        }
        for (write_key, source) in &self.routing.write_keys {
            if let Err(reason) = crate::layout::check_source_id(source) {
                problems.push(format!(
                    "routing.write_keys.{write_key}: source id {source:?} {reason}"
                ));
            }
        }
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        check(
            !self.routing.received_at_field.is_empty(),
            "routing.received_at_field: must not be empty",
        );
        check(
            self.routing.max_message_bytes >= 1,
            "routing.max_message_bytes: must be at least 1",
        );
        check(
            (1..=512).contains(&self.routing.max_json_depth),
            "routing.max_json_depth: must be 1 to 512",
        );
        check(
            (1..=9).contains(&self.buffer.compression_level),
            "buffer.compression_level: must be 1 to 9",
        );
        check(
            self.buffer.max_file_bytes >= 1,
            "buffer.max_file_bytes: must be at least 1",
        );
        check(
            self.buffer.max_batch_bytes >= self.buffer.max_file_bytes.min(1 << 20),
            "buffer.max_batch_bytes: must be at least 1 MiB or buffer.max_file_bytes",
        );
        check(
            self.buffer.max_batch_files >= 1,
            "buffer.max_batch_files: must be at least 1",
        );
        check(
            self.buffer.max_disk_bytes >= 2 * self.buffer.max_batch_bytes.min(1 << 30),
            "buffer.max_disk_bytes: must hold at least two batches (2 x buffer.max_batch_bytes, or 2 GiB)",
        );
        check(
            self.buffer.max_open_compressors >= 1,
            "buffer.max_open_compressors: must be at least 1",
        );
        check(
            self.buffer.checkpoint_interval_secs >= 1,
            "buffer.checkpoint_interval_secs: must be at least 1",
        );
        check(
            self.schedule.interval_secs >= 1 && 86_400 % self.schedule.interval_secs == 0,
            "schedule.interval_secs: must divide a day (e.g. 5, 60, 900, 3600)",
        );
        check(
            self.schedule.offset_secs < self.schedule.interval_secs,
            "schedule.offset_secs: must be below schedule.interval_secs",
        );
        check(
            self.suppression.refresh_secs >= 1,
            "suppression.refresh_secs: must be at least 1",
        );
        check(
            self.metrics.listen.is_empty()
                || self.metrics.listen.parse::<std::net::SocketAddr>().is_ok(),
            "metrics.listen: must be HOST:PORT with an IP address (e.g. 0.0.0.0:9187), or empty",
        );
    }

    /// `text` with the value of every secret Kafka property replaced: librdkafka's own error
    /// messages quote the values they reject, passwords included.
    pub fn redact(&self, text: &str) -> String {
        redact_secrets(text, &self.kafka.properties)
    }

    /// Worker threads to use: the configured number, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.buffer.workers > 0 {
            self.buffer.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// librdkafka settings the archiver's guarantees depend on.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "group.id",
    "group.instance.id",
    "bootstrap.servers",
];

/// `text` with the values of the secret ones among `properties` replaced by `[redacted]`.
pub fn redact_secrets<'a>(
    text: &str,
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> String {
    let mut text = text.to_string();
    for (key, value) in properties {
        if is_secret_property(key) && !value.is_empty() {
            text = text.replace(value.as_str(), "[redacted]");
        }
    }
    text
}

/// Kafka properties whose values are secrets (passwords, keys, tokens, JAAS configs).
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "credential",
        ".key.pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|marker| key.contains(marker))
}

fn is_valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `kafka.properties` of the TOML tree, made a table if it is not one yet.
fn properties_table(root: &mut toml::Table) -> &mut toml::Table {
    let mut table = root;
    for part in ["kafka", "properties"] {
        let entry = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        table = entry.as_table_mut().expect("just made a table");
    }
    table
}

impl KafkaConfig {
    /// Adds `property_files` to `properties`, naming the property and the path (never the
    /// content) of a file that cannot be read.
    fn read_property_files(&mut self, problems: &mut Vec<String>) {
        for (property, path) in &self.property_files {
            if self.properties.contains_key(property) {
                problems.push(format!(
                    "kafka.property_files.{property}: kafka.properties sets it too: set it in one place only"
                ));
                continue;
            }
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let value = text
                        .strip_suffix('\n')
                        .map(|v| v.strip_suffix('\r').unwrap_or(v))
                        .unwrap_or(&text);
                    self.properties.insert(property.clone(), value.to_string());
                }
                Err(err) => problems.push(format!(
                    "kafka.property_files.{property}: cannot read {}: {err}",
                    path.display()
                )),
            }
        }
    }
}

/// Sets `parts` in the TOML tree to `raw`, read as a TOML value when it parses as one
/// (numbers, booleans, arrays) and as a string otherwise.
/// Splits a dotted key as TOML writes it: `kafka.properties."sasl.mechanism"` is three keys,
/// the last one quoted because librdkafka's property names hold dots.
fn key_path(path: &str) -> Result<Vec<String>, String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    for c in path.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    if quoted {
        return Err("a quote in the key is not closed".into());
    }
    if parts.iter().any(String::is_empty) {
        return Err(
            "expected section.key=value (quote keys holding dots: section.table.\"a.b\")".into(),
        );
    }
    Ok(parts)
}

fn set_path(root: &mut toml::Table, parts: &[&str], raw: &str) {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        table = entry.as_table_mut().expect("just made a table");
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
}

/// Deserializes, and on each error records it with its path, removes the offending key and tries
/// again, so one run reports every unknown key and every value of the wrong type.
fn deserialize_collecting(mut root: toml::Table, problems: &mut Vec<String>) -> Option<Config> {
    for _ in 0..64 {
        let value = toml::Value::Table(root.clone());
        match serde_path_to_error::deserialize::<_, Config>(value) {
            Ok(config) => return Some(config),
            Err(err) => {
                let path = err.path().to_string();
                let inner = err.into_inner().to_string();
                let message = inner.lines().next().unwrap_or_default().to_string();
                let mut segments: Vec<String> = path
                    .split('.')
                    .filter(|s| !s.is_empty() && *s != "?")
                    // A bad element of a list (`routing.source[1]`) takes the list with it, so
                    // that the rest of the file is still checked.
                    .map(|s| s.split('[').next().unwrap_or(s).to_string())
                    .collect();
                // For an unknown field the path names its table; the field is in the message.
                if let Some(unknown) = message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    if segments.last().map(String::as_str) != Some(unknown) {
                        segments.push(unknown.to_string());
                    }
                }
                let shown = segments.join(".");
                problems.push(format!(
                    "{}: {message}",
                    if shown.is_empty() { "config" } else { &shown }
                ));
                if !remove_path(&mut root, &segments) {
                    return None;
                }
            }
        }
    }
    None
}

fn remove_path(root: &mut toml::Table, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut table = root;
    for part in parents {
        match table.get_mut(part).and_then(|v| v.as_table_mut()) {
            Some(next) => table = next,
            None => return false,
        }
    }
    table.remove(last).is_some()
}

/// S3's limits on one object: one PUT takes at most 5 GiB, a multipart upload at most 10,000
/// parts of at most 5 GiB each.
const S3_MAX_PUT_BYTES: u64 = 5 << 30;
const S3_MAX_PARTS: u64 = 10_000;

impl Config {
    /// The largest object a local file can become. The size cap is checked after each line, so
    /// a file passes it by up to one line (the longest is a dead letter: the message in base64
    /// inside its envelope); deflate can expand incompressible data slightly and every sync
    /// flush adds a few bytes, bounded here by 1/64.
    pub fn max_object_bytes(&self) -> u64 {
        let longest_line = (self.routing.max_message_bytes as u64).div_ceil(3) * 4 + 4096;
        let uncompressed = self.buffer.max_file_bytes.saturating_add(longest_line);
        uncompressed.saturating_add(uncompressed / 64 + 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archiver.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    /// Kubernetes hands a Secret to a container as an environment variable (`secretKeyRef`) or
    /// as a mounted file; either reaches a librdkafka property without passing the ConfigMap.
    #[test]
    fn secret_properties_come_from_the_environment_or_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "[s3cr3t] true\n").unwrap();
        let config = load_str(
            &format!(
                "[kafka.property_files]\n\"sasl.password\" = {:?}\n",
                password.to_str().unwrap()
            ),
            &[
                ("ARCHIVER_KAFKA_PROPERTY_SASL_USERNAME", "archiver"),
                ("ARCHIVER_KAFKA_PROPERTY_SSL_KEY_PASSWORD", "5000"),
            ],
            &[],
        )
        .unwrap();
        let properties = &config.kafka.properties;
        // Taken as written: a trailing newline (`kubectl create secret --from-file`) dropped,
        // nothing parsed as TOML.
        assert_eq!(properties["sasl.password"], "[s3cr3t] true");
        assert_eq!(properties["sasl.username"], "archiver");
        assert_eq!(properties["ssl.key.password"], "5000");

        let missing = load_str(
            "[kafka.property_files]\n\"sasl.password\" = \"/no/such/secret\"\n",
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("kafka.property_files.sasl.password: cannot read /no/such/secret"),
            "{missing}"
        );
        let twice = load_str(
            &format!(
                "[kafka.properties]\n\"sasl.password\" = \"x\"\n[kafka.property_files]\n\"sasl.password\" = {:?}\n",
                password.to_str().unwrap()
            ),
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(twice.contains("sets it too"), "{twice}");
        // A reserved property cannot come in this way either.
        let reserved = load_str(
            "",
            &[("ARCHIVER_KAFKA_PROPERTY_ENABLE_AUTO_COMMIT", "true")],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(reserved.contains("enable.auto.commit"), "{reserved}");
    }

    #[test]
    fn defaults_are_valid_and_run_against_localhost() {
        let config = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(config.schedule.interval_secs, 3600);
        assert_eq!(config.schedule.offset_secs, 2400);
        assert_eq!(config.routing.day_format, DayFormat::EpochMs);
    }

    #[test]
    fn the_example_file_documents_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("archiver.example.toml");
        let example = Config::load(Some(&path), Vec::new(), &[]).unwrap();
        let defaults = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
    }

    #[test]
    fn env_and_flags_override_the_file_in_that_order() {
        let config = load_str(
            "[kafka]\ntopic = \"from-file\"\n[s3]\nbucket = \"from-file\"\n",
            &[
                ("ARCHIVER_KAFKA_TOPIC", "from-env"),
                ("ARCHIVER_S3_BUCKET", "from-env"),
                ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "5"),
                ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
                ("UNRELATED", "x"),
                ("ARCHIVER_SERVICE_HOST", "10.0.0.1"),
                ("ARCHIVER_PORT", "tcp://10.0.0.1:9090"),
            ],
            &["s3.bucket=from-flag", "s3.force_path_style=true"],
        )
        .unwrap();
        assert_eq!(config.kafka.topic, "from-env");
        assert_eq!(config.s3.bucket, "from-flag");
        assert!(config.s3.force_path_style);
        assert_eq!(config.schedule.interval_secs, 5);
        assert_eq!(config.schedule.offset_secs, 0);
    }

    #[test]
    fn a_mistyped_key_of_a_known_section_is_an_error() {
        let err = Config::load(
            None,
            [("ARCHIVER_KAFKA_TOPICS".to_string(), "x".to_string())],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("kafka.topics"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let err = load_str(
            "[kafka]\ntopic = \"bad topic!\"\nunknown_key = 1\n[s3]\nbucket = \"ab\"\nconcurrency = \"many\"\n[buffer]\ncompression_level = 12\n[nonsense]\nx = 1\n",
            &[],
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "kafka.unknown_key",
            "s3.concurrency",
            "nonsense",
            "kafka.topic",
            "s3.bucket",
            "buffer.compression_level",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }

    #[test]
    fn enumerated_values_are_parsed_and_a_wrong_one_is_named_with_the_choices() {
        let config = load_str(
            "[s3]\nstorage_class = \"STANDARD_IA\"\nserver_side_encryption = \"aws:kms\"\nsse_kms_key_id = \"k\"\nacl = \"bucket-owner-full-control\"\n[routing]\nsource = [\"field:projectId\", \"static:web\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.s3.storage_class, StorageClass::StandardIa);
        assert_eq!(config.s3.server_side_encryption, Encryption::AwsKms);
        assert_eq!(config.s3.acl, CannedAcl::BucketOwnerFullControl);
        assert_eq!(config.s3.acl.as_s3(), Some("bucket-owner-full-control"));
        assert_eq!(
            config.routing.source,
            [
                SourceRule::Field("projectId".into()),
                SourceRule::Static("web".into())
            ]
        );
        assert_eq!(StorageClass::default().as_s3(), None);

        let err = load_str(
            "[s3]\nstorage_class = \"STANDARD-IA\"\nacl = \"owner\"\n[routing]\nsource = [\"field:projectId\", \"column:x\"]\n[buffer]\ncompression_level = 12\n",
            &[],
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "s3.storage_class: \"STANDARD-IA\" is not one of STANDARD, REDUCED_REDUNDANCY, STANDARD_IA",
            "s3.acl: \"owner\" is not one of private,",
            "routing.source: \"column:x\": unknown kind \"column\"",
            // Checked although the list above was wrong.
            "buffer.compression_level",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }

    #[test]
    fn msk_iam_takes_the_s3_region_unless_told_and_refuses_another_sasl_mechanism() {
        let config = load_str(
            "[kafka]\nauth = \"aws-msk-iam\"\n[s3]\nregion = \"eu-west-1\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.kafka.aws_region, "eu-west-1");
        let config = load_str(
            "[kafka]\nauth = \"aws-msk-iam\"\naws_region = \"us-west-2\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.kafka.aws_region, "us-west-2");
        let err = load_str(
            "[kafka]\nauth = \"aws-msk-iam\"\n[kafka.properties]\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("conflicts with kafka.auth"),
            "{err}"
        );
        let err = load_str("[kafka]\nauth = \"iam\"\n", &[], &[]).unwrap_err();
        assert!(err.to_string().contains("kafka.auth"), "{err}");
    }

    #[test]
    fn a_flag_can_set_a_librdkafka_property_whose_name_holds_dots() {
        let config = load_str(
            "",
            &[],
            &[
                "kafka.properties.\"api.version.request\"=false",
                "kafka.properties.\"sasl.jaas.config\"=a=b",
            ],
        )
        .unwrap();
        assert_eq!(
            config
                .kafka
                .properties
                .get("api.version.request")
                .map(String::as_str),
            Some("false")
        );
        assert_eq!(
            config
                .kafka
                .properties
                .get("sasl.jaas.config")
                .map(String::as_str),
            Some("a=b")
        );
        let err = load_str("", &[], &["kafka.properties.\"open=1"]).unwrap_err();
        assert!(err.to_string().contains("not closed"), "{err}");
    }

    #[test]
    fn an_isolation_level_that_would_give_a_replay_other_records_is_refused() {
        // A replay must be given the records its first attempt was (issue 19, finding 6):
        // under read_uncommitted a member reads aborted transactions that a read_committed one
        // skips, and the two cut the same batch differently.
        for (value, ok) in [("read_uncommitted", false), ("read_committed", true)] {
            let toml = format!("[kafka.properties]\n\"isolation.level\" = \"{value}\"\n");
            let result = load_str(&toml, &[], &[]);
            assert_eq!(result.is_ok(), ok, "{value}");
            if let Err(err) = result {
                assert!(err.to_string().contains("isolation.level"), "{err}");
            }
        }
    }

    #[test]
    fn an_offset_reset_that_would_skip_records_is_refused() {
        for (value, ok) in [("latest", false), ("error", false), ("earliest", true)] {
            let toml = format!("[kafka.properties]\n\"auto.offset.reset\" = \"{value}\"\n");
            let result = load_str(&toml, &[], &[]);
            assert_eq!(result.is_ok(), ok, "{value}");
            if let Err(err) = result {
                assert!(err.to_string().contains("auto.offset.reset"), "{err}");
            }
        }
    }

    #[test]
    fn reserved_kafka_properties_are_refused() {
        let err = load_str(
            "[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n\"fetch.max.bytes\" = \"1000\"\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("enable.auto.commit"));
        assert!(!err.to_string().contains("fetch.max.bytes"));
    }

    #[test]
    fn secrets_are_redacted_from_messages() {
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        config
            .kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let message = "property sasl.password hunter2 rejected; protocol SASL_SSL";
        assert_eq!(
            config.redact(message),
            "property sasl.password [redacted] rejected; protocol SASL_SSL"
        );
        assert!(is_secret_property("ssl.key.password"));
        assert!(is_secret_property("sasl.jaas.config"));
        assert!(!is_secret_property("bootstrap.servers"));
    }

    /// A file S3 cannot take (over 10,000 parts, or a single PUT over 5 GiB) would be retried
    /// forever with its offsets held: refused at start instead, naming the limit.
    #[test]
    fn file_caps_beyond_what_s3_accepts_are_refused() {
        // 16 MiB parts hold at most 156 GiB in 10,000 parts.
        let err = load_str("[buffer]\nmax_file_bytes = 200000000000\n", &[], &[]).unwrap_err();
        assert!(err.to_string().contains("10,000 parts"), "{err}");
        // Objects below the multipart threshold go in one PUT, at most 5 GiB.
        let err = load_str(
            "[s3]\nmultipart_threshold_bytes = 6000000000\n[buffer]\nmax_file_bytes = 5500000000\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("5 GiB"), "{err}");
        let err = load_str(
            "[s3]\nmultipart_part_bytes = 6000000000\nmultipart_threshold_bytes = 6000000000\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("s3.multipart_part_bytes"), "{err}");
        // The largest cap the defaults allow still loads.
        load_str("[buffer]\nmax_file_bytes = 150000000000\nmax_batch_bytes = 150000000000\nmax_disk_bytes = 300000000000\n", &[], &[]).unwrap();
    }

    #[test]
    fn schedule_must_divide_a_day() {
        let err =
            load_str("[schedule]\ninterval_secs = 7\noffset_secs = 0\n", &[], &[]).unwrap_err();
        assert!(err.to_string().contains("schedule.interval_secs"));
    }
}
