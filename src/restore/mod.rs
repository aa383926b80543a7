//! Restore: the way back out of the archive. Sends archived events (or dead letters) of some
//! sources and days back into a Kafka topic, one message per line, unchanged, exactly once in
//! total however often it is interrupted and run again.
//!
//! The design, for brokers without transactions (tansu 0.6 refuses `EndTxn`): a plan fixes the
//! objects and their order once (`plan.rs`, stored in the bucket); an idempotent producer sends
//! every line with its position in a header and to the partition its key picks; a rerun reads
//! the last message of the restore in each partition and sends only what lies after it
//! (`position.rs`). It needs a broker with idempotent producers (`InitProducerId`, Kafka 0.11 and
//! later; tansu and librdkafka's mock cluster have them) and write access to
//! `segment-logs/_restores/` in the bucket for the plan. Objects archived after the plan was
//! made are not part of the restore: a restore with another selection or target sends them.
//!
//! Events go out with the `source-id` header set to their source folder, so the archiver's
//! default routing files them under the same source again, and keyed by a field of the event
//! (`anonymousId`, then `userId`, then `messageId` by default) so per-user order survives.
//! Dead letters go out as the original record: its key, headers and payload bytes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine as _;
use futures_util::StreamExt;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka_client::headers::{self, RawHeader};
use crate::kafka_client::{
    client_config, inspector, Auth, ClientRole, Deliveries, Inspector, ProducerCounting,
};
use crate::retry::{self, Backoff, ErrorClass, NoJitter};
use crate::suppress::Suppression;
use crate::upload::manifest::Manifest;
use crate::upload::s3::{S3Error, S3Store};
use crate::upload::suppression::read_list;
use delivery::{
    take_delivery_timeout, AckedAt, Acknowledged, AcknowledgedRecord, AcknowledgementWatch,
    RestoreProducerContext,
};
use plan::{plan_key, run_name, select, Plan, PlannedObject, Selection, PLAN_VERSION};
use position::{partition_for, Position, RunMarker, Sent, POSITION_HEADER};

pub mod delivery;
pub mod plan;
pub mod position;

/// Broker round trips (metadata, watermarks).
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Objects requested ahead of the one being sent.
const PREFETCH_OBJECTS: usize = 8;
/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Attempts of one S3 request before the run stops (`s3`), and the waits between them.
const S3_ATTEMPTS: u32 = 8;
const S3_RETRY_BACKOFF: Duration = Duration::from_millis(250);
const S3_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the positions acknowledged so far are kept in the bucket (`delivery.rs`).
const RECORD_EVERY: Duration = Duration::from_secs(5);
/// How often a run waiting for the broker's last acknowledgements says so.
const WAITING_TOLD_EVERY: Duration = Duration::from_secs(30);

/// What to restore and how fast.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub selection: Selection,
    pub target_topic: String,
    /// Fields of an event whose first present string value keys its message.
    pub key_fields: Vec<String>,
    /// Events per second at most; 0 for as fast as the broker takes them.
    pub rate: u64,
    /// Bytes the producer may hold unacknowledged.
    pub max_in_flight_bytes: u64,
    /// Counts what a run would send, sends nothing, stores no plan.
    pub dry_run: bool,
    /// Skips (and counts) an object that cannot be decompressed or a line that is not what it
    /// should be, instead of stopping.
    pub skip_corrupt: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    pub run: String,
    pub objects: usize,
    /// Compressed bytes of the plan's objects.
    pub object_bytes: u64,
    /// Lines sent by this run (with `dry_run`: that a run would send).
    pub sent: u64,
    /// Lines earlier runs had sent already.
    pub already_sent: u64,
    /// Uncompressed bytes of the lines sent.
    pub sent_bytes: u64,
    /// Objects or lines skipped as corrupt (`skip_corrupt`).
    pub corrupt: u64,
    /// Objects of the selection no batch manifest lists, left out (`Plan::left_out`).
    pub left_out: usize,
    /// Lines of users on the suppression list (`suppress`), not sent.
    pub suppressed: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read the archive: {0}")]
    Bucket(#[from] S3Error),
    #[error("nothing to restore: no archived object of topic {topic} under s3://{bucket}/{prefix} matches the selection")]
    NothingSelected {
        bucket: String,
        prefix: String,
        topic: String,
    },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("the task fetching the plan's objects stopped before the plan's end")]
    FetcherStopped,
    #[error("target topic {0} does not exist (create it first, with the partitions you want)")]
    NoTargetTopic(String),
    #[error("target topic {topic} has {now} partitions but had {planned} when this restore began: lines are placed by partition, so a restore cannot resume across a change (restore into a new topic)")]
    PartitionsChanged {
        topic: String,
        planned: i32,
        now: i32,
    },
    #[error("the stored plan {key} cannot be read: {message}")]
    BadPlan { key: String, message: String },
    #[error(
        "restore {run} was started with --key-field {planned:?} and is run again with {now:?}: \
         keys pick the partitions, so lines would be looked for where they were never sent \
         (duplicates and skips); run it again with --key-field {planned:?}"
    )]
    KeyFieldsChanged {
        run: String,
        planned: Vec<String>,
        now: Vec<String>,
    },
    #[error("cannot draw the key the restore signs its positions with: {0}")]
    SigningKey(String),
    #[error(
        "{key}: {message} (after {lines} lines; --skip-corrupt skips such objects and counts them)"
    )]
    Corrupt {
        key: String,
        lines: u64,
        message: String,
    },
    #[error(
        "{key}: the download broke after {lines} lines, {attempts} times in a row ({message}); \
         run the same restore again to go on from there"
    )]
    BodyBroke {
        key: String,
        lines: u64,
        attempts: u32,
        message: String,
    },
    #[error("{key} line {line}: {message} (--skip-corrupt skips such lines and counts them)")]
    BadLine {
        key: String,
        line: u64,
        message: String,
    },
    #[error("{failed} messages were not delivered (first error: {first}); run the same restore again to send what is missing")]
    Delivery { failed: u64, first: String },
    #[error(
        "the broker acknowledged none of the {waiting} messages waiting for {seconds:.0} s \
         (kafka.properties.message.timeout.ms; is a partition's leader down or unreachable?): \
         the run stopped, leaving each partition its lines up to a point; run the same restore \
         again to send the rest"
    )]
    Unacknowledged { waiting: u64, seconds: f64 },
}

/// Runs a restore to its end (or, with `dry_run`, counts it).
pub async fn restore(
    config: &Config,
    options: &RestoreOptions,
    mut progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let store = S3Store::connect(&config.s3).await;
    let prefix = config.s3.prefix.clone();
    let run = run_name(&options.selection, &prefix, &options.target_topic);

    let kafka = config.kafka.clone();
    let target = options.target_topic.clone();
    let partitions = tokio::task::spawn_blocking(move || target_partitions(&kafka, &target))
        .await
        .expect("metadata thread")?;

    let key = plan_key(&prefix, &run);
    let stored = s3(|| store.get_bytes(&key)).await?;
    // A plan made now has a signing key no message was ever signed with: nothing of the run is
    // in the target yet, and there is nothing to look for.
    let first_run = stored.is_none();
    let (plan, plan_digest) = match stored {
        Some(bytes) => {
            let plan: Plan =
                serde_json::from_slice(&bytes).map_err(|err| RestoreError::BadPlan {
                    key: key.clone(),
                    message: err.to_string(),
                })?;
            tracing::info!(
                run,
                objects = plan.objects.len(),
                "resuming a restore with its stored plan"
            );
            (plan, delivery::plan_digest(&bytes))
        }
        None => {
            let root = format!("{prefix}{}/", crate::layout::ROOT);
            let listing = s3(|| store.list(&root)).await?;
            let selected = select(&prefix, &options.selection, listing.iter().cloned());
            let topic = &options.selection.archived_topic;
            let (objects, left_out) =
                keep_manifest_listed(&store, &prefix, topic, &listing, selected).await?;
            let position_key = RunMarker::new_key().map_err(RestoreError::SigningKey)?;
            let plan = Plan {
                version: PLAN_VERSION,
                run: run.clone(),
                target_topic: options.target_topic.clone(),
                partitions,
                objects,
                position_key: Some(position::to_hex(&position_key)),
                key_fields: Some(options.key_fields.clone()),
                left_out,
            };
            let json = serde_json::to_vec_pretty(&plan).expect("plan serializes");
            if !options.dry_run && !plan.objects.is_empty() {
                s3(|| store.put_bytes(&key, json.clone(), "application/json")).await?;
            }
            (plan, delivery::plan_digest(&json))
        }
    };
    if !plan.left_out.is_empty() {
        tracing::warn!(
            objects = plan.left_out.len(),
            first = ?plan.left_out.iter().take(10).collect::<Vec<_>>(),
            "left out: objects of the selection that no batch manifest lists (an interrupted upload's earlier attempt, a copy, a batch still uploading)"
        );
    }
    // What earlier runs of this plan recorded as acknowledged, for partitions whose messages
    // retention or compaction took since (`delivery.rs`). A record of another plan (this one
    // was made anew after the last was deleted) counts for nothing: its positions are another
    // list of objects'.
    let acknowledged_key = plan::acknowledged_key(&prefix, &run);
    // A first run's plan is new: nothing can have recorded anything for it.
    let stored_record = if first_run {
        None
    } else {
        s3(|| store.get_bytes(&acknowledged_key)).await?
    };
    let recorded = match stored_record {
        Some(bytes) => {
            let record = serde_json::from_slice::<AcknowledgedRecord>(&bytes).map_err(|err| {
                RestoreError::BadPlan {
                    key: acknowledged_key.clone(),
                    message: err.to_string(),
                }
            })?;
            if record.plan == plan_digest {
                record.last
            } else {
                tracing::warn!(key = acknowledged_key, "the record of acknowledged positions belongs to another plan of this restore: not used");
                HashMap::new()
            }
        }
        _ => HashMap::new(),
    };
    if plan.objects.is_empty() {
        return Err(RestoreError::NothingSelected {
            bucket: store.bucket().to_string(),
            prefix: prefix.clone(),
            topic: options.selection.archived_topic.clone(),
        });
    }
    let marker = plan
        .marker()
        .map_err(|message| RestoreError::BadPlan { key, message })?;
    // The list as it is now: a restore never brings back a user deleted from the archive. It
    // only grows, so a rerun leaves out at least what an earlier run did.
    let suppression = s3(|| read_list(&store, &prefix)).await?.map(Arc::new);
    if let Some(list) = &suppression {
        tracing::info!(
            ids = list.len(),
            list = list.hash(),
            "lines of suppressed users are left out"
        );
    }
    if let Some(planned) = plan
        .key_fields
        .as_ref()
        .filter(|planned| **planned != options.key_fields)
    {
        return Err(RestoreError::KeyFieldsChanged {
            run: plan.run.clone(),
            planned: planned.clone(),
            now: options.key_fields.clone(),
        });
    }
    if plan.partitions != partitions {
        return Err(RestoreError::PartitionsChanged {
            topic: options.target_topic.clone(),
            planned: plan.partitions,
            now: partitions,
        });
    }

    // Objects are small and many (one per source, day and batch): fetched one after the
    // other, the restore waited on a GET round trip per object. The next few are requested
    // ahead, in plan order; their bodies are read as the sender gets to them.
    let (bodies, next_body) = tokio::sync::mpsc::channel(PREFETCH_OBJECTS);
    let keys: Vec<String> = plan.objects.iter().map(|o| o.key.clone()).collect();
    let fetcher = store.clone();
    let prefetch = tokio::spawn(async move {
        let mut requests = futures_util::stream::iter(keys)
            .map(|key| {
                let store = fetcher.clone();
                async move { s3(|| store.get_stream(&key)).await }
            })
            .buffered(PREFETCH_OBJECTS);
        while let Some(body) = requests.next().await {
            if bodies.send(body).await.is_err() {
                return; // the sender stopped
            }
        }
    });
    let runtime = tokio::runtime::Handle::current();
    let config = config.clone();
    let options = options.clone();
    let result = tokio::task::spawn_blocking(move || {
        let bodies = ObjectBodies {
            ahead: std::sync::Mutex::new(next_body),
            store,
        };
        let before = SentBefore {
            first_run,
            recorded,
            record_key: acknowledged_key,
            plan_digest,
        };
        let mut sender = Sender::new(&config, &options, &plan, marker, before, runtime, bodies)?;
        sender.suppression = suppression;
        let mut summary = sender.run(&mut progress)?;
        summary.elapsed = started.elapsed();
        Ok(summary)
    })
    .await
    .expect("restore thread");
    prefetch.abort();
    result
}

/// An S3 request of the restore: a transient failure (a reset, a 5xx, throttling) is tried
/// again, up to `S3_ATTEMPTS` times in a row, before the run stops with it; a permanent one
/// (denied, no such bucket) stops it at once.
pub(crate) async fn s3<T, F, Fut>(request: F) -> Result<T, S3Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S3Error>>,
{
    let backoff = Backoff::new(S3_RETRY_BACKOFF, S3_RETRY_MAX_BACKOFF, fastrand::Rng::new());
    retry::bounded(S3_ATTEMPTS, backoff, |err: &S3Error| err.class, request).await
}

/// The selected objects a batch manifest lists (or names as one that may appear), and the keys
/// of those none does, which the restore leaves out (see [`plan::manifests_of`]).
async fn keep_manifest_listed(
    store: &S3Store,
    prefix: &str,
    topic: &str,
    listing: &[(String, i64)],
    selected: Vec<PlannedObject>,
) -> Result<(Vec<PlannedObject>, Vec<String>), RestoreError> {
    let manifests = plan::manifests_of(prefix, topic, listing, &selected);
    let mut fetches = futures_util::stream::iter(manifests)
        .map(|key| async move {
            let bytes = s3(|| store.get_bytes(&key)).await;
            (key, bytes)
        })
        .buffer_unordered(PREFETCH_OBJECTS);
    let mut listed: HashSet<String> = HashSet::new();
    while let Some((key, bytes)) = fetches.next().await {
        match bytes?.map(|bytes| serde_json::from_slice::<Manifest>(&bytes)) {
            Some(Ok(manifest)) => listed.extend(
                manifest
                    .files
                    .into_iter()
                    .chain(manifest.may_appear)
                    .map(|file| file.key),
            ),
            Some(Err(err)) => {
                tracing::warn!(key, error = %err, "a batch manifest that cannot be read: the objects of its batch are left out")
            }
            None => {}
        }
    }
    let (kept, left_out): (Vec<_>, Vec<_>) = selected
        .into_iter()
        .partition(|object| listed.contains(&object.key));
    Ok((
        kept,
        left_out.into_iter().map(|object| object.key).collect(),
    ))
}

/// Progress of a run, for a progress bar or a log line.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub objects_done: usize,
    pub objects: usize,
    pub compressed_read: u64,
    pub compressed_total: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Seconds left at the pace so far, by compressed bytes read.
    pub fn eta(&self) -> Option<Duration> {
        if self.compressed_read == 0 {
            return None;
        }
        let rate = self.compressed_read as f64 / self.elapsed.as_secs_f64().max(1e-3);
        let left = self.compressed_total.saturating_sub(self.compressed_read) as f64;
        Some(Duration::from_secs_f64(left / rate))
    }
}

/// The partitions of the target topic; an error if it does not exist.
fn target_partitions(kafka: &crate::config::KafkaConfig, topic: &str) -> Result<i32, RestoreError> {
    let consumer = inspector(kafka).map_err(|err| RestoreError::Kafka(err.to_string()))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), BROKER_TIMEOUT)
        .map_err(|err| RestoreError::Kafka(format!("cannot read metadata of {topic}: {err}")))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        return Err(RestoreError::NoTargetTopic(topic.to_string()));
    }
    Ok(partitions)
}

/// The last position of `run` in each partition of `topic`: read back from the end of every
/// partition at once, further back for those where no message of the run turned up, until one
/// does or the log's start is reached. Each pass reads up to the ends the partitions had when
/// the search began, so a topic others keep producing to (a live topic, a dead-letter re-drive)
/// does not keep it reading: every message of an earlier run lies before those ends.
fn read_sent(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    partitions: i32,
    run: &RunMarker,
    recorded: &HashMap<i32, AckedAt>,
) -> Result<HashMap<i32, AckedAt>, RestoreError> {
    let consumer = inspector(kafka).map_err(|err| RestoreError::Kafka(err.to_string()))?;
    let mut watermarks = HashMap::new();
    for partition in 0..partitions {
        let low_high = consumer
            .fetch_watermarks(topic, partition, BROKER_TIMEOUT)
            .map_err(|err| {
                RestoreError::Kafka(format!("cannot read the end of {topic}/{partition}: {err}"))
            })?;
        watermarks.insert(partition, low_high);
    }
    let (mut pending, ends) = search_from(&watermarks);
    let mut last = HashMap::new();
    // Per partition, the offset after the last message seen: its end, at least.
    let mut seen_end = ends.clone();
    let mut window = 10_000;
    while !pending.is_empty() {
        let starts: HashMap<i32, i64> = pending
            .iter()
            .map(|(&partition, &(low, began))| (partition, (began - window).max(low)))
            .collect();
        let found = last_of_run(&consumer, topic, &starts, &ends, run)?;
        for (partition, end) in found.seen_end {
            let seen = seen_end.entry(partition).or_insert(end);
            *seen = (*seen).max(end);
        }
        for (partition, from) in starts {
            let low = pending[&partition].0;
            match found.last.get(&partition) {
                Some(&at) => {
                    last.insert(partition, at);
                    pending.remove(&partition);
                }
                None if from <= low => {
                    pending.remove(&partition);
                }
                None => {
                    pending.insert(partition, (low, from));
                }
            }
        }
        window *= 4;
    }
    Ok(latest_sent(last, recorded, &seen_end))
}

/// Per partition: `(low, high)`, its log start and end.
type Watermarks = HashMap<i32, (i64, i64)>;

/// Where the search for a run's last messages begins, from each partition's `(low, high)`
/// watermarks: per partition, its log start and the end the first pass reads back from; and
/// per partition, its end when the search began. Every partition is searched, even one whose
/// watermarks say it is empty: a broker may report a partition's end short of its last record
/// batch (tansu reports 1 for a partition holding one batch of 150 messages; one that reports
/// the batch's start would say 0, empty), and the first pass reads on past the ends for a while
/// (`read_back_to_ends`).
fn search_from(watermarks: &Watermarks) -> (Watermarks, HashMap<i32, i64>) {
    let pending = watermarks
        .iter()
        .map(|(&partition, &(low, high))| (partition, (low, high.max(low))))
        .collect();
    let ends = watermarks
        .iter()
        .map(|(&partition, &(low, high))| (partition, high.max(low)))
        .collect();
    (pending, ends)
}

/// How long a partition may deliver nothing before its read counts as done (its last offsets
/// hold no message: transaction markers, compaction; or it sits at an open transaction).
const READ_BACK_IDLE: Duration = Duration::from_millis(1500);

/// The highest position of `run` in each partition among its messages from `starts` to `ends`
/// (or until the partition stays quiet), then for `READ_BACK_IDLE` more: some brokers report a
/// lower high watermark than they already serve. A pass further back reads the previous pass's
/// messages again: each pass reaches four times further, so that costs at most a third more.
fn last_of_run(
    consumer: &Inspector,
    topic: &str,
    starts: &HashMap<i32, i64>,
    ends: &HashMap<i32, i64>,
    run: &RunMarker,
) -> Result<Found, RestoreError> {
    let mut tpl = TopicPartitionList::new();
    for (&partition, &from) in starts {
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|err| RestoreError::Kafka(err.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|err| RestoreError::Kafka(err.to_string()))?;
    let poll = || match consumer.poll(Duration::from_millis(100)) {
        Some(Ok(message)) => Ok(Some(ReadBack {
            partition: message.partition(),
            offset: message.offset(),
            // Not rdkafka's `headers()`: the target topic may hold a record whose header key is
            // not UTF-8 (a re-driven `bad-header` dead letter), on which it panics.
            position: headers::find(&message, POSITION_HEADER.as_bytes())
                .flatten()
                .and_then(|value| run.decode(&value)),
        })),
        Some(Err(err)) => Err(RestoreError::Kafka(format!(
            "cannot read back {topic}: {err}"
        ))),
        None => Ok(None),
    };
    let found = read_back_to_ends(starts, ends, poll, Instant::now);
    let _ = consumer.unassign();
    found
}

/// One message read back: where it is, and the run's position if it carries one.
struct ReadBack {
    partition: i32,
    offset: i64,
    position: Option<Position>,
}

/// The highest position among the messages `poll` gives, read until every partition reached
/// its end (`ends`: the offset after its last message when the search began) or stayed quiet
/// for `READ_BACK_IDLE`, then for `READ_BACK_IDLE` more. Never until the topic goes quiet: a
/// topic others keep producing to never does. `now`: the clock (a test's own).
fn read_back_to_ends(
    starts: &HashMap<i32, i64>,
    ends: &HashMap<i32, i64>,
    mut poll: impl FnMut() -> Result<Option<ReadBack>, RestoreError>,
    now: impl Fn() -> Instant,
) -> Result<Found, RestoreError> {
    let mut found = Found::default();
    // Partitions not read to their end yet, each with when it last delivered a message.
    let began = now();
    let mut reading: HashMap<i32, Instant> = starts
        .iter()
        .filter(|(partition, from)| ends.get(partition).is_some_and(|end| *from < end))
        .map(|(&partition, _)| (partition, began))
        .collect();
    let mut all_read: Option<Instant> = None;
    loop {
        let at = now();
        reading.retain(|_, last| at.duration_since(*last) < READ_BACK_IDLE);
        if reading.is_empty() && at.duration_since(*all_read.get_or_insert(at)) >= READ_BACK_IDLE {
            return Ok(found);
        }
        let Some(message) = poll()? else {
            continue;
        };
        let partition = message.partition;
        let end = ends.get(&partition).copied().unwrap_or(i64::MIN);
        if message.offset >= end - 1 {
            reading.remove(&partition);
        } else if let Some(last) = reading.get_mut(&partition) {
            *last = now();
        }
        found.note(partition, message.offset, message.position);
    }
}

/// What reading back found: per partition, the run's message of the highest position, and the
/// offset after the last message read (which a broker reporting short watermarks, as tansu
/// does, serves beyond its high watermark).
#[derive(Debug, Default)]
struct Found {
    last: HashMap<i32, AckedAt>,
    seen_end: HashMap<i32, i64>,
}

impl Found {
    fn note(&mut self, partition: i32, offset: i64, position: Option<Position>) {
        let end = self.seen_end.entry(partition).or_insert(offset + 1);
        *end = (*end).max(offset + 1);
        if let Some(position) = position {
            let at = AckedAt { position, offset };
            let last = self.last.entry(partition).or_insert(at);
            if position > last.position {
                *last = at;
            }
        }
    }
}

/// Per partition, the later of what reading back found and what earlier runs recorded as
/// acknowledged (`delivery.rs`): the record covers messages retention or compaction took since.
/// A recorded message at an offset the partition no longer reaches (`ends`: its end, the later
/// of its high watermark and what reading back saw) means the topic was deleted and created
/// again, or truncated: the record says nothing of what it holds now, and is not used there.
fn latest_sent(
    found: HashMap<i32, AckedAt>,
    recorded: &HashMap<i32, AckedAt>,
    ends: &HashMap<i32, i64>,
) -> HashMap<i32, AckedAt> {
    let mut latest = found;
    for (&partition, &at) in recorded {
        let end = ends.get(&partition).copied().unwrap_or(0);
        if at.offset >= end {
            tracing::warn!(partition, recorded_offset = at.offset, end, "the target partition ends before the message the run recorded as acknowledged (the topic was created again or truncated): reading it back alone");
            continue;
        }
        let last = latest.entry(partition).or_insert(at);
        if at.position > last.position {
            *last = at;
        }
    }
    latest
}

/// Sends a plan's lines; runs on a blocking thread and reads objects through `runtime`.
struct Sender<'a> {
    options: &'a RestoreOptions,
    plan: &'a Plan,
    /// What marks this run's messages (signed positions).
    marker: RunMarker,
    runtime: tokio::runtime::Handle,
    bodies: ObjectBodies,
    sent_before: Sent,
    producer: Option<ThreadedProducer<RestoreProducerContext>>,
    deliveries: Arc<Deliveries>,
    /// Stops the run when the broker stops acknowledging (`delivery.rs`).
    acknowledgements: std::cell::RefCell<AcknowledgementWatch>,
    /// The last position acknowledged per partition, kept in the bucket at `record_key` every
    /// `RECORD_EVERY` and at the end, for a rerun after retention took the run's last messages.
    acknowledged: Arc<Acknowledged>,
    record_key: String,
    recorded: std::cell::RefCell<(Instant, AcknowledgedRecord)>,
    /// Users whose lines are not sent (`suppress`).
    suppression: Option<Arc<Suppression>>,
}

/// What the sender needs to know what earlier runs sent.
struct SentBefore {
    /// Nothing of a first run can be in the target yet (its signing key is new).
    first_run: bool,
    /// The last positions earlier runs of this plan recorded as acknowledged, where they keep
    /// them, and the plan's digest the record names.
    recorded: HashMap<i32, AckedAt>,
    record_key: String,
    plan_digest: String,
}

/// One message to send.
struct Outgoing {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    /// Keys as bytes: a `bad-header` dead letter goes back with the key it came with.
    headers: Vec<RawHeader>,
}

impl<'a> Sender<'a> {
    fn new(
        config: &Config,
        options: &'a RestoreOptions,
        plan: &'a Plan,
        marker: RunMarker,
        before: SentBefore,
        runtime: tokio::runtime::Handle,
        bodies: ObjectBodies,
    ) -> Result<Sender<'a>, RestoreError> {
        let last_sent = if before.first_run {
            HashMap::new()
        } else {
            let (topic, partitions) = (&plan.target_topic, plan.partitions);
            read_sent(&config.kafka, topic, partitions, &marker, &before.recorded)?
        };
        let sent_before = Sent::new(last_sent.iter().map(|(&p, at)| (p, at.position)).collect());
        let acknowledged = Arc::new(Acknowledged::starting_from(before.plan_digest, last_sent));
        let deliveries = Arc::new(Deliveries::default());
        let mut timeout = None;
        let producer = if options.dry_run {
            None
        } else {
            let mut client = client_config(
                &config.kafka,
                ClientRole::Restorer {
                    max_in_flight_kbytes: (options.max_in_flight_bytes / 1024).max(1),
                },
            );
            // Delivery failures must not leave holes the next run would step over: one failed
            // message fails all after it, and none times out alone (`delivery.rs`).
            client.set("enable.gapless.guarantee", "true");
            timeout = take_delivery_timeout(&mut client)?;
            let producer: ThreadedProducer<RestoreProducerContext> = client
                .create_with_context(RestoreProducerContext {
                    counting: ProducerCounting {
                        deliveries: Arc::clone(&deliveries),
                        auth: Auth::for_config(&config.kafka),
                    },
                    acknowledged: Arc::clone(&acknowledged),
                })
                .map_err(|err| RestoreError::Kafka(config.redact(&err.to_string())))?;
            Some(producer)
        };
        Ok(Sender {
            options,
            plan,
            marker,
            runtime,
            bodies,
            sent_before,
            producer,
            deliveries,
            acknowledgements: AcknowledgementWatch::new(timeout, Instant::now()).into(),
            recorded: (Instant::now(), acknowledged.record()).into(),
            acknowledged,
            record_key: before.record_key,
            suppression: None,
        })
    }

    /// Keeps what the broker acknowledged in the bucket, if it changed since it was last kept
    /// and `RECORD_EVERY` passed (or `now`). A failure is told, not fatal: the record only
    /// spares a rerun lines whose messages retention took, the read-back covers the rest.
    fn record_acknowledged(&self, now: bool) {
        let mut recorded = self.recorded.borrow_mut();
        if self.producer.is_none() || !now && recorded.0.elapsed() < RECORD_EVERY {
            return;
        }
        recorded.0 = Instant::now();
        let record = self.acknowledged.record();
        if record == recorded.1 {
            return;
        }
        // One attempt, not the retries of `s3`: sending waits on it, and the next record is
        // due in a few seconds anyway.
        let json = serde_json::to_vec(&record).expect("record serializes");
        let store = &self.bodies.store;
        match self
            .runtime
            .block_on(store.put_bytes(&self.record_key, json, "application/json"))
        {
            Ok(()) => recorded.1 = record,
            Err(err) => {
                tracing::warn!(key = self.record_key, error = %err, "cannot keep the positions acknowledged so far in the bucket (a rerun reads them back from the target instead)")
            }
        }
    }

    fn run(&self, progress: &mut dyn FnMut(&Progress)) -> Result<RestoreSummary, RestoreError> {
        let summary = RestoreSummary {
            run: self.plan.run.clone(),
            objects: self.plan.objects.len(),
            left_out: self.plan.left_out.len(),
            object_bytes: self
                .plan
                .objects
                .iter()
                .map(|o| o.bytes.max(0) as u64)
                .sum(),
            ..RestoreSummary::default()
        };
        let report = Progress {
            objects: summary.objects,
            compressed_total: summary.object_bytes,
            ..Progress::default()
        };
        let mut tally = Tally {
            summary,
            report,
            started: Instant::now(),
            last_report: Instant::now(),
            progress,
        };
        let sent = self.send_all(&mut tally);
        // Whether the run ended or stopped, what the broker acknowledged stays acknowledged.
        self.record_acknowledged(true);
        sent?;
        tally.report_now();
        Ok(tally.summary)
    }

    /// Sends every line of the plan and waits for the broker to acknowledge them all.
    fn send_all(&self, tally: &mut Tally<'_>) -> Result<(), RestoreError> {
        for (index, object) in self.plan.objects.iter().enumerate() {
            match self.send_object(index as u32, object, tally) {
                Ok(()) => {}
                Err(err @ (RestoreError::Corrupt { .. } | RestoreError::BadLine { .. }))
                    if self.options.skip_corrupt =>
                {
                    tracing::warn!(error = %err, "skipping what cannot be restored");
                    tally.summary.corrupt += 1;
                }
                Err(err) => return Err(err),
            }
            tally.report.objects_done = index + 1;
            tally.report.compressed_read += object.bytes.max(0) as u64;
        }
        if let Some(producer) = &self.producer {
            // Every line handed over must be acknowledged before the run says it is done.
            let mut told = Instant::now();
            loop {
                match producer.flush(Duration::from_secs(1)) {
                    Ok(()) => break,
                    Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                        self.check_delivery(producer)?;
                        self.record_acknowledged(false);
                        if told.elapsed() >= WAITING_TOLD_EVERY {
                            told = Instant::now();
                            let waiting = producer.in_flight_count();
                            let watch = self.acknowledgements.borrow();
                            let unacknowledged_secs = watch.stalled_for(Instant::now()).as_secs();
                            tracing::info!(
                                waiting,
                                unacknowledged_secs,
                                "waiting for the broker to acknowledge what was sent"
                            );
                        }
                    }
                    Err(err) => return Err(RestoreError::Kafka(err.to_string())),
                }
            }
            self.check_delivery(producer)?;
        }
        Ok(())
    }

    /// Whether the run may go on sending: the producer has not stopped, no message failed,
    /// and the broker still acknowledges (a run that goes on past a failure could deliver
    /// later lines of a partition than the one that failed: a hole a rerun steps over).
    fn check_delivery(
        &self,
        producer: &ThreadedProducer<RestoreProducerContext>,
    ) -> Result<(), RestoreError> {
        // A message the broker refused (too large, an invalid record for a compacted topic)
        // also stops the producer (`enable.gapless.guarantee`): its own error says more.
        let failed = self.deliveries.failed();
        if failed > 0 {
            let first = self.deliveries.first_error();
            return Err(RestoreError::Delivery { failed, first });
        }
        if let Some((code, reason)) = producer.client().fatal_error() {
            return Err(RestoreError::Kafka(format!(
                "the producer stopped ({code:?}): {reason}; restore needs a broker with idempotent producers"
            )));
        }
        let waiting = producer.in_flight_count().max(0) as u64;
        self.acknowledgements.borrow_mut().check(
            self.deliveries.delivered(),
            waiting,
            Instant::now(),
        )
    }

    /// Sends the object's lines. A download that breaks (connection reset, timeout: a body
    /// fetched ahead can sit idle a long while) is fetched again and goes on after the lines
    /// already handled; only bytes that do not decode are corrupt.
    fn send_object(
        &self,
        index: u32,
        object: &PlannedObject,
        tally: &mut Tally<'_>,
    ) -> Result<(), RestoreError> {
        let mut body = self
            .bodies
            .ahead
            .lock()
            .expect("bodies lock")
            .blocking_recv()
            .ok_or(RestoreError::FetcherStopped)??;
        let mut resume = BodyResume::default();
        loop {
            let lines = LinesFrom {
                index,
                object,
                handled: resume.handled,
            };
            match self.send_lines(lines, body, tally) {
                Err(RestoreError::BodyBroke { lines, message, .. }) => {
                    let Some(delay) = resume.broke(lines) else {
                        return Err(RestoreError::BodyBroke {
                            key: object.key.clone(),
                            lines: resume.handled,
                            attempts: BODY_ATTEMPTS,
                            message,
                        });
                    };
                    tracing::warn!(key = object.key, lines = resume.handled, %message, "the download broke: fetching the object again, going on after the lines handled");
                    std::thread::sleep(delay);
                    let store = &self.bodies.store;
                    body = self
                        .runtime
                        .block_on(s3(|| store.get_stream(&object.key)))?;
                }
                result => return result,
            }
        }
    }

    /// Sends the lines of one download of an object from line `handled` on (the earlier ones
    /// were handled before its previous download broke).
    fn send_lines(
        &self,
        from: LinesFrom<'_>,
        body: ByteStream,
        tally: &mut Tally<'_>,
    ) -> Result<(), RestoreError> {
        let LinesFrom {
            index,
            object,
            handled,
        } = from;
        let reader = StreamRead {
            body,
            runtime: self.runtime.clone(),
            chunk: Vec::new(),
            at: 0,
        };
        let compressed = BufReader::with_capacity(1 << 16, reader);
        let decoded: Box<dyn Read> = match crate::layout::Codec::of_key(&object.key) {
            Some(crate::layout::Codec::Zstd) => Box::new(
                zstd::stream::read::Decoder::with_buffer(compressed)
                    .map_err(|err| read_failure(&object.key, 0, err))?,
            ),
            _ => Box::new(flate2::bufread::MultiGzDecoder::new(compressed)),
        };
        let mut lines = BufReader::with_capacity(1 << 16, decoded);
        let mut line = Vec::new();
        let mut number: u64 = 0;
        loop {
            line.clear();
            let read = lines
                .read_until(b'\n', &mut line)
                .map_err(|err| read_failure(&object.key, number, err))?;
            if read == 0 {
                return Ok(());
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.is_empty() {
                continue;
            }
            let position = Position {
                object: index,
                line: number,
            };
            number += 1;
            if position.line < handled {
                continue;
            }
            let outgoing = match self.outgoing(object, &line) {
                Ok(Some(outgoing)) if self.suppresses(object, &line, &outgoing) => {
                    tally.summary.suppressed += 1;
                    continue;
                }
                Ok(Some(outgoing)) => outgoing,
                Ok(None) => continue,
                Err(message) if self.options.skip_corrupt => {
                    tracing::warn!(key = object.key, line = position.line, %message, "skipping a line that cannot be restored");
                    tally.summary.corrupt += 1;
                    continue;
                }
                Err(message) => {
                    return Err(RestoreError::BadLine {
                        key: object.key.clone(),
                        line: position.line,
                        message,
                    })
                }
            };
            let partition = partition_for(outgoing.key.as_deref(), position, self.plan.partitions);
            if self.sent_before.contains(partition, position) {
                tally.summary.already_sent += 1;
                continue;
            }
            self.pace(tally.summary.sent, tally.started);
            if let Some(producer) = &self.producer {
                self.send(producer, partition, position, &outgoing)?;
            }
            tally.sent(outgoing.payload.len() as u64);
            self.record_acknowledged(false);
        }
    }

    /// The message a line becomes; `None` for a dead letter of a reason not selected.
    fn outgoing(&self, object: &PlannedObject, line: &[u8]) -> Result<Option<Outgoing>, String> {
        match &object.source {
            Some(source) => {
                let event: serde_json::Value =
                    serde_json::from_slice(line).map_err(|err| format!("not JSON: {err}"))?;
                let key = self
                    .options
                    .key_fields
                    .iter()
                    .find_map(|field| event.get(field)?.as_str().filter(|v| !v.is_empty()))
                    .map(|key| key.as_bytes().to_vec());
                Ok(Some(Outgoing {
                    key,
                    payload: line.to_vec(),
                    headers: vec![(b"source-id".to_vec(), Some(source.as_bytes().to_vec()))],
                }))
            }
            None => dead_letter_record(line, &self.options.selection.reasons),
        }
    }

    /// Whether a line is a suppressed user's: any top-level `userId` or `anonymousId` of the
    /// event (or of the dead letter's record, or its key), as routing matches them.
    fn suppresses(&self, object: &PlannedObject, line: &[u8], outgoing: &Outgoing) -> bool {
        let Some(list) = &self.suppression else {
            return false;
        };
        let json = if object.source.is_some() {
            line
        } else {
            &outgoing.payload
        };
        let key = (object.source.is_none())
            .then(|| {
                outgoing
                    .key
                    .as_deref()
                    .and_then(|key| std::str::from_utf8(key).ok())
            })
            .flatten();
        crate::suppress::top_level_ids(json)
            .iter()
            .map(String::as_str)
            .chain(key)
            .any(|id| list.matches(id))
    }

    /// Waits as long as `--rate` asks (not in a dry run, which sends nothing).
    fn pace(&self, sent: u64, started: Instant) {
        if self.options.rate == 0 || self.producer.is_none() {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.options.rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }

    fn send(
        &self,
        producer: &ThreadedProducer<RestoreProducerContext>,
        partition: i32,
        position: Position,
        outgoing: &Outgoing,
    ) -> Result<(), RestoreError> {
        let header = self.marker.encode(position);
        let mut headers = OwnedHeaders::new();
        for (key, value) in &outgoing.headers {
            headers = headers::insert(headers, key, value.as_deref());
        }
        headers = headers.insert(Header {
            key: POSITION_HEADER,
            value: Some(header.as_bytes()),
        });
        let mut record = BaseRecord::with_opaque_to(&self.plan.target_topic, Box::new(position))
            .partition(partition)
            .payload(&outgoing.payload)
            .headers(headers);
        if let Some(key) = &outgoing.key {
            record = record.key(key);
        }
        self.check_delivery(producer)?;
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                // The in-flight bound is reached: wait for acknowledgements.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.check_delivery(producer)?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((err, _)) => {
                    let object = &self.plan.objects[position.object as usize].key;
                    return Err(RestoreError::Kafka(format!(
                        "{object} line {}: the producer refused it: {err}",
                        position.line
                    )));
                }
            }
        }
    }
}

/// The original record of a dead-letter line (its key, headers and payload), if its reason is
/// among `reasons` (all when empty).
fn dead_letter_record(line: &[u8], reasons: &BTreeSet<String>) -> Result<Option<Outgoing>, String> {
    #[derive(serde::Deserialize)]
    struct Header {
        /// A UTF-8 key; `key_base64` holds any other (`bad-header`).
        key: Option<String>,
        key_base64: Option<String>,
        value_base64: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct DeadLetter {
        reason: String,
        key_base64: Option<String>,
        #[serde(default)]
        headers: Vec<Header>,
        payload_base64: Option<String>,
        #[serde(default)]
        payload_bytes: usize,
        /// A `too-large` letter keeps a prefix of the record (routing code 2 on).
        #[serde(default)]
        payload_truncated: bool,
    }
    let letter: DeadLetter =
        serde_json::from_slice(line).map_err(|err| format!("not a dead letter: {err}"))?;
    if !reasons.is_empty() && !reasons.contains(&letter.reason) {
        return Ok(None);
    }
    if letter.payload_truncated {
        return Err(format!(
            "a {} dead letter keeps only the start of its {}-byte record and a SHA-256 of all of \
             it: it cannot be sent back as the record was (select other --reason values)",
            letter.reason, letter.payload_bytes
        ));
    }
    let decode = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|err| format!("bad base64 in a dead letter: {err}"))
    };
    let Some(payload) = letter.payload_base64.as_deref() else {
        // A tombstone has nothing to send back.
        return Ok(None);
    };
    Ok(Some(Outgoing {
        key: letter.key_base64.as_deref().map(decode).transpose()?,
        payload: decode(payload)?,
        headers: letter
            .headers
            .iter()
            .map(|h| {
                let key = match (&h.key, &h.key_base64) {
                    (Some(text), _) => text.as_bytes().to_vec(),
                    (None, Some(encoded)) => decode(encoded)?,
                    (None, None) => return Err("a dead letter's header has no key".to_string()),
                };
                Ok((key, h.value_base64.as_deref().map(decode).transpose()?))
            })
            // A position header among the original's (a record a producer forged, or one an
            // earlier restore sent) would be read back as this run's progress: never re-sent.
            .filter(|header| {
                !matches!(header, Ok((key, _)) if key.as_slice() == POSITION_HEADER.as_bytes())
            })
            .collect::<Result<_, String>>()?,
    }))
}

/// What a run has done so far, and the progress it shows (every `PROGRESS_EVERY`).
struct Tally<'p> {
    summary: RestoreSummary,
    report: Progress,
    started: Instant,
    last_report: Instant,
    progress: &'p mut dyn FnMut(&Progress),
}

impl Tally<'_> {
    /// A line of `bytes` went to the producer.
    fn sent(&mut self, bytes: u64) {
        self.summary.sent += 1;
        self.summary.sent_bytes += bytes;
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            self.report_now();
        }
    }

    fn report_now(&mut self) {
        self.report.sent = self.summary.sent;
        self.report.sent_bytes = self.summary.sent_bytes;
        self.report.elapsed = self.started.elapsed();
        (self.progress)(&self.report);
    }
}

/// The plan's object bodies: those requested ahead, in plan order, and the store to fetch one
/// again whose download broke.
struct ObjectBodies {
    ahead: std::sync::Mutex<tokio::sync::mpsc::Receiver<Result<ByteStream, S3Error>>>,
    store: S3Store,
}

/// Downloads of one object in a row that may break before the run stops; between them, the
/// archiver's one backoff (`retry::Backoff`) from `BODY_RETRY_BACKOFF`.
const BODY_ATTEMPTS: u32 = 5;
const BODY_RETRY_BACKOFF: Duration = Duration::from_millis(250);
const BODY_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the next download of an object goes on, and whether one more may be tried: downloads
/// that break without getting past the lines already handled are breaks in a row, and
/// `BODY_ATTEMPTS` of them stop the run; one that got further starts the count again.
struct BodyResume {
    /// Lines of the object handled by any download so far: never lowered by a download that
    /// broke earlier than another (its lines were skipped, not sent, and are sent already).
    handled: u64,
    backoff: Backoff<NoJitter>,
}

impl Default for BodyResume {
    fn default() -> BodyResume {
        BodyResume {
            handled: 0,
            backoff: Backoff::new(BODY_RETRY_BACKOFF, BODY_RETRY_MAX_BACKOFF, NoJitter),
        }
    }
}

impl BodyResume {
    /// A download broke after `lines` lines of the object: how long to wait before fetching
    /// it again, `None` when that was the last break in a row allowed.
    fn broke(&mut self, lines: u64) -> Option<Duration> {
        if lines > self.handled {
            *self = BodyResume {
                handled: lines,
                ..BodyResume::default()
            };
        }
        let delay = self.backoff.next_delay(ErrorClass::Transient);
        (self.backoff.attempts() < BODY_ATTEMPTS).then_some(delay)
    }
}

/// Which lines of which object a download goes on with.
struct LinesFrom<'p> {
    index: u32,
    object: &'p PlannedObject,
    /// Lines of the object handled by earlier downloads of it.
    handled: u64,
}

/// The transport under an object's body failed: the bytes so far were fine, the rest is still
/// in the bucket.
#[derive(Debug)]
struct BodyBroke(String);

impl std::fmt::Display for BodyBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyBroke {}

/// What reading an object's lines failed on, after `lines` lines: its download (`BodyBroke`,
/// fetched again), or bytes that do not decode (`Corrupt`).
fn read_failure(key: &str, lines: u64, err: std::io::Error) -> RestoreError {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<BodyBroke>())
    {
        Some(broke) => RestoreError::BodyBroke {
            key: key.to_string(),
            lines,
            attempts: 1,
            message: broke.0.clone(),
        },
        None => RestoreError::Corrupt {
            key: key.to_string(),
            lines,
            message: format!("not a valid compressed object: {err}"),
        },
    }
}

/// An object's body as a blocking reader: chunks are awaited on the runtime, never whole.
struct StreamRead {
    body: ByteStream,
    runtime: tokio::runtime::Handle,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.runtime.block_on(self.body.next()) {
                Some(Ok(bytes)) => {
                    self.chunk.clear();
                    self.chunk.extend_from_slice(&bytes);
                    self.at = 0;
                }
                Some(Err(err)) => return Err(std::io::Error::other(BodyBroke(err.to_string()))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_goes_back_as_the_record_it_was() {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let line = serde_json::json!({
            "topic": "events", "partition": 0, "offset": 7, "timestamp_ms": null,
            "reason": "no-source",
            "key_base64": b64(b"user-1"),
            "headers": [
                {"key": "h", "value_base64": b64(b"v")},
                {"key": "empty", "value_base64": null},
                {"key_base64": b64(b"\xff\xfek"), "value_base64": b64(b"w")},
                {"key": POSITION_HEADER, "value_base64": b64(b"forged")}
            ],
            "payload_base64": b64(b"{\"type\":\"track\"}"),
            "payload_bytes": 16
        })
        .to_string();
        let all = BTreeSet::new();
        let record = dead_letter_record(line.as_bytes(), &all).unwrap().unwrap();
        assert_eq!(record.key.as_deref(), Some(&b"user-1"[..]));
        assert_eq!(record.payload, b"{\"type\":\"track\"}");
        assert_eq!(
            record.headers,
            [
                (b"h".to_vec(), Some(b"v".to_vec())),
                (b"empty".to_vec(), None),
                (b"\xff\xfek".to_vec(), Some(b"w".to_vec())),
            ]
        );
        let other: BTreeSet<String> = ["not-json".to_string()].into();
        assert!(dead_letter_record(line.as_bytes(), &other)
            .unwrap()
            .is_none());
        assert!(dead_letter_record(b"{}", &all).is_err());

        // A too-large letter keeps only the record's start: never sent as if it were all of it.
        let truncated = serde_json::json!({
            "reason": "too-large",
            "key_base64": null,
            "headers": [],
            "payload_base64": b64(b"{\"type\":\"tr"),
            "payload_bytes": 2_000_000,
            "payload_truncated": true,
            "payload_sha256": "00"
        })
        .to_string();
        let err = dead_letter_record(truncated.as_bytes(), &all)
            .err()
            .expect("a truncated letter is not sent");
        assert!(err.contains("2000000-byte record"), "{err}");
        let not_selected: BTreeSet<String> = ["no-source".to_string()].into();
        assert!(dead_letter_record(truncated.as_bytes(), &not_selected)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_download_that_breaks_earlier_than_the_last_never_sends_lines_again() {
        let mut resume = BodyResume::default();
        assert_eq!(resume.broke(50_000), Some(BODY_RETRY_BACKOFF));
        assert_eq!(resume.handled, 50_000);
        // The next download broke sooner: its lines were skipped; the next goes on at 50,000.
        assert!(resume.broke(10_000).is_some());
        assert_eq!(resume.handled, 50_000);
        // Breaks without progress are counted in a row...
        assert!(resume.broke(50_000).is_some());
        assert!(resume.broke(0).is_some());
        assert_eq!(resume.broke(50_000), None);
        // ...and progress starts the count again: a long object on a flaky link goes on.
        let mut resume = BodyResume::default();
        for lines in 1..=20 {
            assert!(resume.broke(lines * 1_000).is_some(), "break {lines}");
        }
    }

    /// A body that gives `good` bytes, then fails as a broken connection does.
    struct Breaking {
        bytes: Vec<u8>,
        good: usize,
        at: usize,
    }

    impl Read for Breaking {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at >= self.good {
                return Err(std::io::Error::other(BodyBroke("connection reset".into())));
            }
            let n = buf.len().min(self.good - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// The lines read, and what stopped the reading.
    fn read_lines(decoded: &mut dyn Read) -> (u64, RestoreError) {
        let mut lines = BufReader::new(decoded);
        let (mut number, mut line) = (0, Vec::new());
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) => panic!("read to the end"),
                Ok(_) => number += 1,
                Err(err) => return (number, read_failure("k", number, err)),
            }
        }
    }

    #[test]
    fn a_broken_download_is_told_from_a_corrupt_object_through_either_decoder() {
        use std::io::Write as _;
        let text: String = (0..20_000)
            .map(|n| format!("{{\"messageId\":\"m{n}\",\"n\":{}}}\n", n * 7919 % 10007))
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(text.as_bytes(), 3).unwrap();

        for (name, bytes) in [("gzip", gz), ("zstd", zst)] {
            let good = bytes.len() / 2;
            let body = || Breaking {
                bytes: bytes.clone(),
                good,
                at: 0,
            };
            let mut decoded: Box<dyn Read> = match name {
                "gzip" => Box::new(flate2::bufread::MultiGzDecoder::new(BufReader::new(body()))),
                _ => Box::new(zstd::stream::read::Decoder::new(body()).unwrap()),
            };
            let (lines, err) = read_lines(&mut decoded);
            assert!(lines > 100, "{name}: {lines} lines before the break");
            assert!(
                matches!(&err, RestoreError::BodyBroke { lines: l, .. } if *l == lines),
                "{name}: {err}"
            );

            // The same place holding other bytes: corrupt, not a broken download.
            let mut damaged = bytes.clone();
            for byte in &mut damaged[good..good + 64] {
                *byte ^= 0x5a;
            }
            let mut decoded: Box<dyn Read> = match name {
                "gzip" => Box::new(flate2::bufread::MultiGzDecoder::new(&damaged[..])),
                _ => Box::new(zstd::stream::read::Decoder::new(&damaged[..]).unwrap()),
            };
            let (_, err) = read_lines(&mut decoded);
            assert!(matches!(err, RestoreError::Corrupt { .. }), "{name}: {err}");
        }
    }

    /// A clock that moves only when the test says.
    struct TestClock(std::cell::Cell<Instant>);

    impl TestClock {
        fn advance(&self, by: Duration) {
            self.0.set(self.0.get() + by);
        }
    }

    #[test]
    fn reading_back_stops_at_the_ends_the_search_began_with_on_a_topic_that_never_goes_quiet() {
        let clock = TestClock(std::cell::Cell::new(Instant::now()));
        let starts = HashMap::from([(0, 0), (1, 0)]);
        let ends = HashMap::from([(0, 1_000), (1, 500)]);
        // Both partitions: the earlier run's messages first (positions), then live traffic
        // arriving faster than it is read, for ever.
        let mut next = [0i64, 0];
        let mut polls = 0u64;
        let poll = || {
            polls += 1;
            assert!(
                polls < 1_000_000,
                "still reading a topic that never goes quiet"
            );
            clock.advance(Duration::from_millis(1));
            let partition = (polls % 2) as i32;
            let offset = next[partition as usize];
            next[partition as usize] += 1;
            let sent_by_the_run = if partition == 0 { 800 } else { 300 };
            Ok(Some(ReadBack {
                partition,
                offset,
                position: (offset < sent_by_the_run).then_some(Position {
                    object: 0,
                    line: offset as u64,
                }),
            }))
        };
        let found = read_back_to_ends(&starts, &ends, poll, || clock.0.get()).unwrap();
        assert_eq!(
            found.last[&0].position,
            Position {
                object: 0,
                line: 799
            }
        );
        assert_eq!(
            found.last[&1].position,
            Position {
                object: 0,
                line: 299
            }
        );
        // Both ends reached after 2,000 messages, then 1.5 s more at one a millisecond.
        assert!(polls < 4_000, "{polls} polls");
    }

    #[test]
    fn a_partition_the_broker_reports_as_empty_is_searched_all_the_same() {
        // Partition 1's only batch: the broker reports its end as the batch's start.
        let watermarks = HashMap::from([(0, (0, 500)), (1, (0, 0)), (2, (7, 7))]);
        let (pending, ends) = search_from(&watermarks);
        assert_eq!(
            pending,
            HashMap::from([(0, (0, 500)), (1, (0, 0)), (2, (7, 7))])
        );
        assert_eq!(ends, HashMap::from([(0, 500), (1, 0), (2, 7)]));

        // Read from its start, its messages turn up while the other partitions are read.
        let clock = TestClock(std::cell::Cell::new(Instant::now()));
        let starts = HashMap::from([(0, 0), (1, 0)]);
        let ends = HashMap::from([(0, 2), (1, 0)]);
        let mut polled = 0;
        let poll = || {
            clock.advance(Duration::from_millis(10));
            polled += 1;
            Ok(match polled {
                1 | 2 => Some(ReadBack {
                    partition: 0,
                    offset: polled - 1,
                    position: None,
                }),
                3..=150 => Some(ReadBack {
                    partition: 1,
                    offset: polled - 3,
                    position: Some(Position {
                        object: 0,
                        line: polled as u64 - 3,
                    }),
                }),
                _ => None,
            })
        };
        let found = read_back_to_ends(&starts, &ends, poll, || clock.0.get()).unwrap();
        let position = Position {
            object: 0,
            line: 147,
        };
        let offset = 147;
        assert_eq!(found.last.get(&1), Some(&AckedAt { position, offset }));
        // Its end is where reading back got, past what the broker reported.
        assert_eq!(found.seen_end.get(&1), Some(&148));
    }

    #[test]
    fn what_was_sent_is_the_later_of_the_read_back_and_a_record_the_partition_still_reaches() {
        let at = |object, line, offset| AckedAt {
            position: Position { object, line },
            offset,
        };
        // Read back: partition 0 further than the record (a run killed between two records);
        // partition 1 behind it (retention took its last messages); partition 2 empty; and
        // partition 3 ends before the recorded message (the topic was created again).
        let found = HashMap::from([(0, at(3, 10, 900)), (1, at(0, 5, 40))]);
        let recorded = HashMap::from([
            (0, at(2, 0, 700)),
            (1, at(1, 8, 80)),
            (2, at(0, 0, 3)),
            (3, at(5, 5, 500)),
        ]);
        let ends = HashMap::from([(0, 1_000), (1, 7_000), (2, 4), (3, 20)]);
        assert_eq!(
            latest_sent(found, &recorded, &ends),
            HashMap::from([(0, at(3, 10, 900)), (1, at(1, 8, 80)), (2, at(0, 0, 3))])
        );
    }

    #[test]
    fn a_partition_whose_last_offsets_hold_no_message_is_read_until_it_stays_quiet() {
        let clock = TestClock(std::cell::Cell::new(Instant::now()));
        let starts = HashMap::from([(0, 0)]);
        // Offsets 98 and 99 are transaction markers: no message reaches them.
        let ends = HashMap::from([(0, 100)]);
        let mut offset = 0;
        let poll = || {
            if offset == 98 {
                clock.advance(Duration::from_millis(100));
                return Ok(None);
            }
            offset += 1;
            let line = offset as u64 - 1;
            Ok(Some(ReadBack {
                partition: 0,
                offset: offset - 1,
                position: Some(Position { object: 2, line }),
            }))
        };
        let began = clock.0.get();
        let found = read_back_to_ends(&starts, &ends, poll, || clock.0.get()).unwrap();
        assert_eq!(
            found.last[&0].position,
            Position {
                object: 2,
                line: 97
            }
        );
        let took = clock.0.get() - began;
        assert!(
            took <= READ_BACK_IDLE * 2 + Duration::from_millis(200),
            "{took:?}"
        );
    }
}
