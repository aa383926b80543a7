//! `forget`: deleting users from the archive (GDPR Article 17, the CCPA), as Segment's
//! `SUPPRESS_WITH_DELETE` does: their ids go on the suppression list first (nothing new of
//! theirs is archived), then, once no batch that could still hold their events is open or
//! awaiting a replay ([`wait`]), every object of the selection that holds one is rewritten
//! without those lines under the same key ([`rewrite`]), and its batch manifest after it.
//!
//! Exactly once and resumable: the request is named by its ids and selection, and every
//! rewrite is journaled before the first one ([`journal`]); a rerun of the same request reads
//! the journal and, object by object, finds from its content whether it was rewritten, so a
//! `forget` killed at any moment and run again finishes without rewriting anything twice. An
//! object whose manifest is not updated yet holds exactly what the journal says it will, which
//! `verify` reports as such. An audit record, ids hashed, says what was done.

pub mod journal;
pub mod rewrite;
pub mod wait;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;

use crate::config::Config;
use crate::consume::lag::{group_lag, records_between, LagError, PartitionLag};
use crate::layout::{self, Codec};
use crate::restore::plan::{place, ManifestRanges};
use crate::restore::s3;
use crate::suppress::{list_key, IdHash, Request, Suppression};
use crate::upload::manifest::Manifest;
use crate::upload::s3::{ObjectMetadata, S3Error, S3Store};
use crate::upload::store::ObjectStore;
use journal::{audit_key, journal_key, request_id, Audit, ForgetSelection, Journal, Rewrite};
use rewrite::{filter_object, Levels};
use wait::{IntentView, PartitionView, Waiting};

/// Objects read or rewritten at once, unless the operator says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// How often the wait looks again.
const WAIT_POLL: Duration = Duration::from_secs(5);

/// What `forget` tells its caller as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    /// A step taken, or what it waits for: a line.
    Step(String),
    /// After each object read or rewritten: `done` of `total` objects, and what that is (the
    /// caller draws a bar on a terminal, or logs a line now and then).
    Progress { done: u64, total: u64, what: String },
}

/// What to forget, and how.
#[derive(Debug, Clone)]
pub struct ForgetOptions {
    pub ids: BTreeSet<IdHash>,
    pub selection: ForgetSelection,
    /// Read and report what would be rewritten; change nothing, suppress nothing.
    pub dry_run: bool,
    /// Stop waiting after this long with an error (the ids stay suppressed; a rerun goes on).
    pub wait_limit: Option<Duration>,
    /// Where rewritten objects are written before they are put (`None`: the system's
    /// temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Objects read or rewritten at once.
    pub concurrency: usize,
    /// Finish this request from its journal (its ids and selection are read from it, and
    /// `ids` and `selection` are not used).
    pub finish: Option<String>,
}

/// What a run did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetSummary {
    pub request: String,
    pub dry_run: bool,
    /// The run went on from the journal of an earlier one.
    pub resumed: bool,
    pub objects_in_selection: u64,
    pub objects_read: u64,
    pub bytes_read: u64,
    /// Objects that hold the users' events.
    pub objects_holding: u64,
    pub lines_removed: u64,
    pub uncompressed_bytes_removed: u64,
    /// Put by this run.
    pub objects_rewritten: u64,
    /// Found rewritten already (an earlier run of the request).
    pub objects_already_rewritten: u64,
    pub manifests_updated: u64,
    /// Earlier versions of rewritten objects deleted (a versioned bucket keeps the overwritten
    /// object as one).
    pub versions_deleted: u64,
    /// Objects (or earlier versions) holding the users' events that were not rewritten (or
    /// deleted), each with why.
    pub left_alone: Vec<String>,
    /// A dry run's partitions that still hold batches cut before the ids were suppressed.
    pub waiting: Vec<String>,
    pub audit_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("no id to forget: use --id or --ids-file")]
    NoIds,
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Kafka(#[from] LagError),
    #[error("the journal of request {request} at {key} cannot be read: {message}")]
    BadJournal {
        request: String,
        key: String,
        message: String,
    },
    #[error("cannot use the work directory {path}: {message}")]
    WorkDir { path: String, message: String },
    #[error("forget request {request} is unfinished (it has a journal and no audit record): finish it first (`forget --finish {request}`); two requests at once could undo each other's manifest updates")]
    OtherUnfinished { request: String },
    #[error("no forget request {request} to finish: {key} is not in the bucket")]
    NothingToFinish { request: String, key: String },
    #[error("gave up waiting after {secs} s (the ids are suppressed; run the same forget again to finish): {waiting}")]
    StillWaiting { secs: u64, waiting: String },
}

/// Runs a request to its end: suppress, wait, read, journal, rewrite, audit (see the module
/// doc). `say` hears each step and the progress of reading and rewriting.
pub async fn forget(
    config: &Config,
    options: ForgetOptions,
    say: &(dyn Fn(Said) + Sync),
) -> Result<ForgetSummary, ForgetError> {
    let store = S3Store::connect(&config.s3).await;
    let prefix = config.s3.prefix.as_str();
    let topic = config.kafka.topic.as_str();
    let options = match &options.finish {
        Some(request) => options_of_journal(&store, prefix, request, options.clone()).await?,
        None => options,
    };
    if options.ids.is_empty() {
        return Err(ForgetError::NoIds);
    }
    let request = request_id(prefix, topic, &options.ids, &options.selection);
    let started = Utc::now();
    let mut summary = ForgetSummary {
        request: request.clone(),
        dry_run: options.dry_run,
        ..ForgetSummary::default()
    };
    let stored = stored_journal(&store, prefix, &request, &options.ids).await?;
    let (committed, suppressed_since) = match &stored {
        Some(journal) => {
            say(Said::Step(format!(
                "request {request}: going on from its journal ({} objects to rewrite)",
                journal.rewrites.len()
            )));
            let since = find_suppression(&store, prefix, &request).await?;
            (HashMap::new(), since)
        }
        None if options.dry_run => {
            let views = partition_views(config, &store, &options.ids).await?;
            // Batches cut before any list holds the ids, which a dry run cannot read yet.
            summary.waiting = views
                .iter()
                .filter_map(|(view, _)| {
                    let intent = view.intent.filter(|i| view.from <= i.end)?;
                    (!intent.cut_under_list).then(|| {
                        let waiting = Waiting::BatchBeforeList {
                            start: intent.start.max(view.from),
                            end: intent.end,
                        };
                        format!("partition {}: {waiting}", view.partition)
                    })
                })
                .collect();
            (committed_of(&views), None)
        }
        None => {
            refuse_if_another_unfinished(&store, prefix, &request).await?;
            let since = ensure_suppressed(&store, prefix, &request, &options.ids, say).await?;
            let committed = wait_until_clean(config, &store, &options, since, say).await?;
            (committed, Some(since))
        }
    };
    let context = RequestContext {
        prefix,
        topic,
        request: &request,
        options: &options,
        levels: Levels {
            gzip: config.buffer.compression_level,
            zstd: config.output.zstd_level,
        },
        suppressed_since,
        started,
    };
    in_bucket(&store, &context, stored, &committed, &mut summary, say).await?;
    Ok(summary)
}

/// A request as its bucket work needs it.
pub struct RequestContext<'a> {
    pub prefix: &'a str,
    pub topic: &'a str,
    pub request: &'a str,
    pub options: &'a ForgetOptions,
    pub levels: Levels,
    pub suppressed_since: Option<DateTime<Utc>>,
    pub started: DateTime<Utc>,
}

/// The journal an earlier run of `request` stored, if any.
pub async fn stored_journal<S: ObjectStore>(
    store: &S,
    prefix: &str,
    request: &str,
    ids: &BTreeSet<IdHash>,
) -> Result<Option<Journal>, ForgetError> {
    let key = journal_key(prefix, request);
    let Some(bytes) = s3(|| store.get_bytes(&key)).await? else {
        return Ok(None);
    };
    read_journal(request, &key, &bytes, ids).map(Some)
}

/// The request's work in the bucket, once nothing that could hold the users' events is open:
/// without a `stored` journal, reads the objects of the committed batches (`committed`) and
/// journals the rewrites; then rewrites, updates the manifests and leaves the audit record.
pub async fn in_bucket<S: ObjectStore>(
    store: &S,
    context: &RequestContext<'_>,
    stored: Option<Journal>,
    committed: &HashMap<i32, i64>,
    summary: &mut ForgetSummary,
    say: &(dyn Fn(Said) + Sync),
) -> Result<(), ForgetError> {
    let RequestContext {
        prefix,
        topic,
        request,
        options,
        ..
    } = *context;
    let list = Arc::new(Suppression::new(options.ids.iter().copied()));
    let journal = match stored {
        Some(journal) => {
            summary.resumed = true;
            journal
        }
        None => {
            let root = format!("{prefix}{}/", layout::ROOT);
            let listing = s3(|| store.list(&root)).await?;
            let (candidates, uncommitted) =
                candidates(prefix, topic, &listing, &options.selection, committed);
            summary.objects_in_selection = candidates.len() as u64;
            let keys: Vec<u64> = options.ids.iter().map(|id| id.key).collect();
            let candidates =
                narrow_by_index(store, prefix, topic, candidates, &keys, options.concurrency)
                    .await?;
            summary.left_alone.extend(uncommitted.iter().map(|(partition, objects)| {
                format!(
                    "partition {partition}: the group has no committed offset (its offsets expired, or another group.id archived it), so its {objects} objects in the selection were not read: their batches may still be open"
                )
            }));
            let scan = scan(store, &candidates, &list, options.concurrency, say).await?;
            summary.objects_read = scan.objects_read;
            summary.bytes_read = scan.bytes_read;
            summary.left_alone.extend(scan.unreadable);
            let journal = Journal {
                version: journal::JOURNAL_VERSION,
                request: request.to_string(),
                made: Utc::now(),
                ids: options.ids.iter().map(IdHash::encode).collect(),
                selection: options.selection.clone(),
                rewrites: scan.rewrites,
                started: Some(context.started),
                objects_read: scan.objects_read,
                bytes_read: scan.bytes_read,
            };
            if !options.dry_run {
                // Again, as late as can be: another may have begun during the wait.
                refuse_if_another_unfinished(store, prefix, request).await?;
                // Before the first rewrite: a rerun finishes from it, `verify` explains with it.
                let key = journal_key(prefix, request);
                s3(|| store.put_bytes(&key, journal.to_json(), "application/json")).await?;
                say(Said::Step(format!(
                    "journal stored ({key}): {} objects to rewrite",
                    journal.rewrites.len()
                )));
            }
            journal
        }
    };
    summary.objects_read = journal.objects_read;
    summary.bytes_read = journal.bytes_read;
    summary.objects_holding = journal.rewrites.len() as u64;
    summary.lines_removed = journal.rewrites.iter().map(Rewrite::removed).sum();
    summary.uncompressed_bytes_removed = journal
        .rewrites
        .iter()
        .map(|r| r.old.uncompressed_bytes - r.new.uncompressed_bytes)
        .sum();
    if options.dry_run {
        return Ok(());
    }

    let work_dir = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work_dir = work_dir.join(format!("kafka-s3-archiver-forget-{request}"));
    let dir = work_dir.clone();
    tokio::task::spawn_blocking(move || make_private_dir(&dir))
        .await
        .expect("work directory thread")?;
    let applied = apply(
        store,
        prefix,
        topic,
        &journal,
        &list,
        context.levels,
        &work_dir,
        options.concurrency,
        say,
    )
    .await;
    let _ = tokio::fs::remove_dir_all(&work_dir).await;
    let applied = applied?;
    summary.objects_rewritten = applied.rewritten;
    summary.objects_already_rewritten = applied.already;
    summary.manifests_updated = applied.manifests_updated;
    summary.versions_deleted = applied.versions_deleted;
    summary.left_alone.extend(applied.left_alone);

    let audit = Audit {
        request: request.to_string(),
        suppressed_since: context.suppressed_since,
        started: journal.started.unwrap_or(context.started),
        finished: Utc::now(),
        id_sha256s: options.ids.iter().map(IdHash::sha256_hex).collect(),
        selection: options.selection.clone(),
        objects_read: summary.objects_read,
        bytes_read: summary.bytes_read,
        objects_rewritten: summary.objects_rewritten + summary.objects_already_rewritten,
        lines_removed: summary.lines_removed,
        manifests_updated: summary.manifests_updated,
        versions_deleted: summary.versions_deleted,
        left_alone: summary.left_alone.clone(),
    };
    let key = audit_key(prefix, request);
    s3(|| store.put_bytes(&key, audit.to_json(), "application/json")).await?;
    summary.audit_key = Some(key);
    Ok(())
}

/// The options of the request whose journal is stored under `request`: its ids and selection.
async fn options_of_journal<S: ObjectStore>(
    store: &S,
    prefix: &str,
    request: &str,
    options: ForgetOptions,
) -> Result<ForgetOptions, ForgetError> {
    let key = journal_key(prefix, request);
    let Some(bytes) = s3(|| store.get_bytes(&key)).await? else {
        return Err(ForgetError::NothingToFinish {
            request: request.to_string(),
            key,
        });
    };
    let bad = |message: String| ForgetError::BadJournal {
        request: request.to_string(),
        key: key.clone(),
        message,
    };
    let journal = parse_journal(request, &key, &bytes)?;
    let ids = journal
        .ids
        .iter()
        .map(|text| IdHash::decode(text).ok_or_else(|| bad(format!("not an id hash: {text}"))))
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(ForgetOptions {
        ids,
        selection: journal.selection,
        ..options
    })
}

/// Requests run one at a time: a manifest updated by two at once could lose one's update.
/// Refuses while another request has a journal and no audit record (killed, or running).
pub async fn refuse_if_another_unfinished<S: ObjectStore>(
    store: &S,
    prefix: &str,
    request: &str,
) -> Result<(), ForgetError> {
    let root = journal::forget_prefix(prefix);
    let listing = s3(|| store.list(&root)).await?;
    let mut journaled = BTreeSet::new();
    let mut audited = BTreeSet::new();
    for (key, _) in &listing {
        match journal::request_of(prefix, key) {
            Some((other, true)) => journaled.insert(other.to_string()),
            Some((other, false)) => audited.insert(other.to_string()),
            None => false,
        };
    }
    match journaled
        .difference(&audited)
        .find(|other| other.as_str() != request)
    {
        Some(other) => Err(ForgetError::OtherUnfinished {
            request: other.clone(),
        }),
        None => Ok(()),
    }
}

fn read_journal(
    request: &str,
    key: &str,
    bytes: &[u8],
    ids: &BTreeSet<IdHash>,
) -> Result<Journal, ForgetError> {
    let journal = parse_journal(request, key, bytes)?;
    let ours: Vec<String> = ids.iter().map(IdHash::encode).collect();
    if journal.ids != ours {
        return Err(ForgetError::BadJournal {
            request: request.to_string(),
            key: key.to_string(),
            message: "it forgets other ids than these".into(),
        });
    }
    Ok(journal)
}

fn parse_journal(request: &str, key: &str, bytes: &[u8]) -> Result<Journal, ForgetError> {
    serde_json::from_slice(bytes).map_err(|err| ForgetError::BadJournal {
        request: request.to_string(),
        key: key.to_string(),
        message: err.to_string(),
    })
}

fn make_private_dir(path: &Path) -> Result<(), ForgetError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|err| ForgetError::WorkDir {
            path: path.display().to_string(),
            message: err.to_string(),
        })
}

/// The suppression request this forget request made, by its name; its time.
async fn find_suppression<S: ObjectStore>(
    store: &S,
    prefix: &str,
    request: &str,
) -> Result<Option<DateTime<Utc>>, S3Error> {
    let suffix = format!("-{request}.json");
    let requests = crate::suppress::requests_prefix(prefix);
    let listing = s3(|| store.list(&requests)).await?;
    let Some((key, _)) = listing.into_iter().find(|(key, _)| key.ends_with(&suffix)) else {
        return Ok(None);
    };
    let bytes = s3(|| store.get_bytes(&key)).await?;
    Ok(bytes
        .and_then(|bytes| Request::parse(&bytes).ok())
        .map(|request| request.time))
}

/// Puts the ids on the suppression list, once per request (a rerun finds its own); the time
/// the request went in.
async fn ensure_suppressed<S: ObjectStore>(
    store: &S,
    prefix: &str,
    request: &str,
    ids: &BTreeSet<IdHash>,
    say: &(dyn Fn(Said) + Sync),
) -> Result<DateTime<Utc>, S3Error> {
    if let Some(since) = find_suppression(store, prefix, request).await? {
        return Ok(since);
    }
    let (made, key) =
        s3(|| crate::upload::suppression::submit_named(store, prefix, ids, request.to_string()))
            .await?;
    say(Said::Step(format!(
        "{} ids added to the suppression list ({key}): nothing new of theirs is archived from each partition's next batch",
        ids.len()
    )));
    Ok(made.time)
}

/// Each partition of the topic as [`wait::judge`] sees it, with its committed offset.
async fn partition_views<S: ObjectStore>(
    config: &Config,
    store: &S,
    ids: &BTreeSet<IdHash>,
) -> Result<Vec<(PartitionView, Option<i64>)>, ForgetError> {
    let kafka_config = config.clone();
    // rdkafka calls block: keep them off the async threads.
    let (lags, records_left) = tokio::task::spawn_blocking(move || {
        let lags = group_lag(&kafka_config)?;
        let ranges: Vec<(i32, i64, i64)> = lags
            .iter()
            .map(|lag| {
                let from = lag.committed.unwrap_or(lag.low_watermark);
                (lag.partition, from, lag.end_offset)
            })
            .collect();
        let records_left = records_between(&kafka_config, &ranges)?;
        Ok::<_, LagError>((lags, records_left))
    })
    .await
    .expect("kafka lookup thread")?;
    let prefix = &config.s3.prefix;
    Ok(views_of(store, prefix, &config.kafka.topic, lags, &records_left, ids).await?)
}

/// Each partition of `lags` (the group's offsets and the log's ends) as [`wait::judge`] sees
/// it, with its committed offset: its newest batch intent, and whether that batch was cut
/// under a list holding every id. `records_left`: whether Kafka holds a record from the
/// commit on (a partition it does not name is taken to).
pub async fn views_of<S: ObjectStore>(
    store: &S,
    prefix: &str,
    topic: &str,
    lags: Vec<PartitionLag>,
    records_left: &HashMap<i32, bool>,
    ids: &BTreeSet<IdHash>,
) -> Result<Vec<(PartitionView, Option<i64>)>, S3Error> {
    let mut lists: HashMap<String, bool> = HashMap::new();
    let mut views = Vec::new();
    for lag in lags {
        let key = layout::intent_key(prefix, topic, lag.partition);
        let intent = s3(|| store.get_bytes(&key))
            .await?
            .and_then(|bytes| serde_json::from_slice::<crate::pipeline::BatchIntent>(&bytes).ok());
        let intent = match intent {
            None => None,
            Some(intent) => {
                let cut_under_list =
                    rules_hold_ids(store, prefix, &intent.rules, ids, &mut lists).await?;
                Some(IntentView {
                    start: intent.start,
                    end: intent.end,
                    cut_under_list,
                })
            }
        };
        let view = PartitionView {
            partition: lag.partition,
            from: lag.committed.unwrap_or(lag.low_watermark),
            end_offset: lag.end_offset,
            records_left: records_left.get(&lag.partition).copied().unwrap_or(true),
            intent,
        };
        views.push((view, lag.committed));
    }
    Ok(views)
}

/// Whether the cutting rules stored as `hash` name a suppression list holding every id
/// (`lists` remembers each list's answer).
async fn rules_hold_ids<S: ObjectStore>(
    store: &S,
    prefix: &str,
    hash: &str,
    ids: &BTreeSet<IdHash>,
    lists: &mut HashMap<String, bool>,
) -> Result<bool, S3Error> {
    let key = crate::rules::rules_key(prefix, hash);
    // Read loosely: rules of any release name their list the same way.
    let list_hash = s3(|| store.get_bytes(&key))
        .await?
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|rules| rules.get("suppression")?.as_str().map(str::to_string));
    let Some(list_hash) = list_hash else {
        return Ok(false);
    };
    if let Some(&holds) = lists.get(&list_hash) {
        return Ok(holds);
    }
    let key = list_key(prefix, &list_hash);
    let holds = s3(|| store.get_bytes(&key))
        .await?
        .and_then(|bytes| Suppression::parse(&bytes, &list_hash).ok())
        .is_some_and(|list| ids.iter().all(|id| list.holds(id)));
    lists.insert(list_hash, holds);
    Ok(holds)
}

fn committed_of(views: &[(PartitionView, Option<i64>)]) -> HashMap<i32, i64> {
    views
        .iter()
        .filter_map(|(view, committed)| Some((view.partition, (*committed)?)))
        .collect()
}

/// Waits until every partition is clean ([`wait::judge`]), saying what it waits for whenever
/// that changes; the committed offsets then.
async fn wait_until_clean<S: ObjectStore>(
    config: &Config,
    store: &S,
    options: &ForgetOptions,
    since: DateTime<Utc>,
    say: &(dyn Fn(Said) + Sync),
) -> Result<HashMap<i32, i64>, ForgetError> {
    // Twice a member's refresh period: one to read the request, one of margin for a slow read.
    let members_read =
        since + chrono::Duration::seconds(2 * config.suppression.refresh_secs as i64);
    let started = Instant::now();
    let mut baseline: Option<wait::Baseline> = None;
    let mut said = String::new();
    loop {
        let views = partition_views(config, store, &options.ids).await?;
        if baseline.is_none() && Utc::now() >= members_read {
            baseline = Some(wait::baseline_of(&views));
        }
        let waiting: Vec<String> = wait::still_waiting(&views, baseline.as_ref())
            .into_iter()
            .map(|(partition, why)| format!("partition {partition}: {why}"))
            .collect();
        if waiting.is_empty() {
            return Ok(committed_of(&views));
        }
        let now_waiting = waiting.join("; ");
        if options
            .wait_limit
            .is_some_and(|limit| started.elapsed() >= limit)
        {
            return Err(ForgetError::StillWaiting {
                secs: started.elapsed().as_secs(),
                waiting: now_waiting,
            });
        }
        if now_waiting != said {
            say(Said::Step(format!("waiting: {now_waiting}")));
            said = now_waiting;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// An object `forget` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub key: String,
    pub size: i64,
    /// Its batch's manifest; `None` for an object no manifest covers.
    pub manifest: Option<String>,
    pub dead_letter: bool,
}

/// The objects of the selection (events and dead letters of the topic) in batches the group
/// committed (`committed`: each partition's next offset): only those can never be replayed.
/// Also how many objects of the selection lie in partitions the group never committed, which
/// are not read (their batches may still be open).
pub fn candidates(
    prefix: &str,
    topic: &str,
    listing: &[(String, i64)],
    selection: &ForgetSelection,
    committed: &HashMap<i32, i64>,
) -> (Vec<Candidate>, BTreeMap<i32, u64>) {
    let root = format!("{prefix}{}/", layout::ROOT);
    let manifests = ManifestRanges::of(prefix, topic, listing);
    let mut uncommitted: BTreeMap<i32, u64> = BTreeMap::new();
    let chosen = listing
        .iter()
        .filter_map(|(key, size)| {
            let (source, day, partition, first_offset) = place(&root, topic, key)?;
            if !selection.covers(source.as_deref(), day) {
                return None;
            }
            let Some(&committed) = committed.get(&partition) else {
                *uncommitted.entry(partition).or_default() += 1;
                return None;
            };
            let manifest = manifests.covering(key);
            // A batch is committed whole; an object no manifest covers, by its first line.
            let last = manifest
                .and_then(layout::manifest_range)
                .map_or(first_offset, |(_, end)| end);
            (last < committed).then(|| Candidate {
                key: key.clone(),
                size: *size,
                manifest: manifest.map(str::to_string),
                dead_letter: source.is_none(),
            })
        })
        .collect();
    (chosen, uncommitted)
}

/// The candidates their batch's id index says may hold one of the users (routing `keys`);
/// every candidate of a batch without an index (an earlier release's, or unreadable). Each
/// index is dropped once its batch's candidates are judged: a year of them is not held at once.
pub async fn narrow_by_index<S: ObjectStore>(
    store: &S,
    prefix: &str,
    topic: &str,
    candidates: Vec<Candidate>,
    keys: &[u64],
    concurrency: usize,
) -> Result<Vec<Candidate>, S3Error> {
    let mut by_batch: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for candidate in &candidates {
        if let Some(manifest) = &candidate.manifest {
            by_batch
                .entry(manifest.clone())
                .or_default()
                .push(candidate.key.clone());
        }
    }
    let keys: Arc<[u64]> = keys.into();
    let mut judged = futures_util::stream::iter(by_batch)
        .map(|(manifest, objects)| {
            let keys = Arc::clone(&keys);
            async move {
                let Some(key) = crate::index::index_of_manifest(prefix, topic, &manifest) else {
                    return Ok(Vec::new());
                };
                let Some(bytes) = s3(|| store.get_bytes(&key)).await? else {
                    return Ok(Vec::new());
                };
                // Parsing an index and its filters is CPU work: off the async threads.
                let ruled_out = tokio::task::spawn_blocking(move || {
                    let Ok(index) = serde_json::from_slice::<crate::index::BatchIndex>(&bytes)
                    else {
                        return Vec::new();
                    };
                    objects
                        .into_iter()
                        .filter(|object| !index.may_hold(object, &keys))
                        .collect()
                })
                .await
                .expect("index thread");
                Ok::<Vec<String>, S3Error>(ruled_out)
            }
        })
        .buffer_unordered(concurrency);
    let mut ruled_out: std::collections::HashSet<String> = Default::default();
    while let Some(objects) = judged.next().await {
        ruled_out.extend(objects?);
    }
    Ok(candidates
        .into_iter()
        .filter(|candidate| !ruled_out.contains(&candidate.key))
        .collect())
}

/// What reading the selection found.
#[derive(Debug, Default)]
pub struct Scan {
    pub rewrites: Vec<Rewrite>,
    pub objects_read: u64,
    pub bytes_read: u64,
    /// Objects that could not be read as an archive object (damaged): left as they are.
    pub unreadable: Vec<String>,
}

/// Reads every candidate and plans the rewrite of each that holds a listed user's line.
pub async fn scan<S: ObjectStore>(
    store: &S,
    candidates: &[Candidate],
    list: &Arc<Suppression>,
    concurrency: usize,
    say: &(dyn Fn(Said) + Sync),
) -> Result<Scan, S3Error> {
    let mut found = Scan::default();
    let mut reads = futures_util::stream::iter(candidates)
        .map(|candidate| async move {
            let bytes = s3(|| store.get_bytes(&candidate.key)).await?;
            let Some(bytes) = bytes else {
                return Ok::<_, S3Error>(None);
            };
            let read = bytes.len() as u64;
            let (key, dead_letter, list) = (
                candidate.key.clone(),
                candidate.dead_letter,
                Arc::clone(list),
            );
            let filtered = tokio::task::spawn_blocking(move || {
                filter_object(&key, &bytes, dead_letter, &list, None)
            })
            .await
            .expect("object reading thread");
            Ok(Some((candidate, read, filtered)))
        })
        .buffered(concurrency);
    while let Some(read) = reads.next().await {
        let Some((candidate, bytes, filtered)) = read? else {
            continue;
        };
        found.objects_read += 1;
        found.bytes_read += bytes;
        match filtered {
            Ok(filtered) if filtered.removed() > 0 => found.rewrites.push(Rewrite {
                key: candidate.key.clone(),
                manifest: candidate.manifest.clone(),
                old: filtered.old,
                new: filtered.new,
                old_compressed_bytes: bytes,
            }),
            Ok(_) => {}
            Err(err) => found.unreadable.push(format!(
                "{}: cannot be read ({err}); not rewritten",
                candidate.key
            )),
        }
        say(Said::Progress {
            done: found.objects_read,
            total: candidates.len() as u64,
            what: format!(
                "read ({} MB), {} hold the users' events",
                found.bytes_read / 1_000_000,
                found.rewrites.len()
            ),
        });
    }
    Ok(found)
}

/// What rewriting the journal's objects did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub rewritten: u64,
    pub already: u64,
    pub manifests_updated: u64,
    pub versions_deleted: u64,
    pub left_alone: Vec<String>,
}

/// What one object was found holding, and what became of it.
enum Outcome {
    /// Put without the users' lines: what it held, and holds now.
    Put(Recorded),
    /// An earlier run put it (the manifest may still describe what it held).
    Already(Recorded),
    /// It holds none of the users' lines, though not what the journal says: another request
    /// rewrote it since.
    Clean,
    LeftAlone(String),
}

/// An object's content before and after its rewrite, as its manifest entry is to say.
struct Recorded {
    from: rewrite::Content,
    to: rewrite::Content,
    compressed_bytes: u64,
    /// The ids its lines name now, for its batch's id index.
    ids: crate::index::IdFilter,
}

/// Rewrites every object of `journal` that does not hold its new content yet, then updates
/// each batch manifest whose objects are rewritten. An object that cannot be rewritten is
/// named in `left_alone` and the others go on: its manifest entry stays as it was.
#[allow(clippy::too_many_arguments)]
pub async fn apply<S: ObjectStore>(
    store: &S,
    prefix: &str,
    topic: &str,
    journal: &Journal,
    list: &Arc<Suppression>,
    levels: Levels,
    work_dir: &Path,
    concurrency: usize,
    say: &(dyn Fn(Said) + Sync),
) -> Result<Applied, ForgetError> {
    let root = format!("{prefix}{}/", layout::ROOT);
    let mut applied = Applied::default();
    // Where the bucket cannot say (denied, or a store that answers it wrongly), each rewritten
    // key's versions are looked up anyway: a bucket without versions lists none.
    let keeps_versions = match s3(|| store.keeps_versions()).await {
        Ok(keeps) => keeps,
        // A store without versioning at all (Garage) keeps none.
        Err(err) if err.code.as_deref() == Some("NotImplemented") => false,
        Err(_) => true,
    };
    let mut done: BTreeMap<&str, Vec<(&str, Recorded)>> = BTreeMap::new();
    let mut rewrites = futures_util::stream::iter(journal.rewrites.iter().enumerate())
        .map(|(index, rewrite)| {
            let path = work_dir.join(format!("{index}.part"));
            let root = root.as_str();
            async move {
                let outcome = rewrite_one(store, root, topic, rewrite, list, levels, &path)
                    .await
                    .unwrap_or_else(|err| Outcome::LeftAlone(format!("{}: {err}", rewrite.key)));
                let _ = tokio::fs::remove_file(&path).await;
                let versions = match &outcome {
                    Outcome::Put(_) | Outcome::Already(_) | Outcome::Clean if keeps_versions => {
                        Some(delete_earlier_versions(store, &rewrite.key).await)
                    }
                    _ => None,
                };
                (rewrite, outcome, versions)
            }
        })
        .buffer_unordered(concurrency);
    let mut handled = 0;
    while let Some((rewrite, outcome, versions)) = rewrites.next().await {
        handled += 1;
        say(Said::Progress {
            done: handled,
            total: journal.rewrites.len() as u64,
            what: "rewritten".into(),
        });
        if let Some((deleted, kept)) = versions {
            applied.versions_deleted += deleted;
            applied.left_alone.extend(kept);
        }
        let recorded = match outcome {
            Outcome::Put(recorded) => {
                applied.rewritten += 1;
                recorded
            }
            Outcome::Already(recorded) => {
                applied.already += 1;
                recorded
            }
            Outcome::Clean => {
                applied.already += 1;
                continue;
            }
            Outcome::LeftAlone(why) => {
                applied.left_alone.push(why);
                continue;
            }
        };
        if let Some(manifest) = &rewrite.manifest {
            done.entry(manifest)
                .or_default()
                .push((&rewrite.key, recorded));
        }
    }
    for (manifest_key, rewritten) in done {
        if let Err(why) = update_index(store, prefix, topic, manifest_key, &rewritten).await {
            applied.left_alone.push(why);
        }
        match update_manifest(store, manifest_key, &rewritten).await {
            Ok(true) => applied.manifests_updated += 1,
            Ok(false) => {}
            Err(why) => applied.left_alone.push(why),
        }
    }
    Ok(applied)
}

async fn rewrite_one<S: ObjectStore>(
    store: &S,
    root: &str,
    topic: &str,
    rewrite: &Rewrite,
    list: &Arc<Suppression>,
    levels: Levels,
    path: &Path,
) -> Result<Outcome, ForgetError> {
    let key = rewrite.key.as_str();
    let Some(bytes) = s3(|| store.get_bytes(key)).await? else {
        return Ok(Outcome::LeftAlone(format!(
            "{key}: no longer in the bucket"
        )));
    };
    let Some((source, _, partition, first_offset)) = place(root, topic, key) else {
        return Ok(Outcome::LeftAlone(format!("{key}: not an archive object")));
    };
    let dead_letter = source.is_none();
    let size = bytes.len() as u64;
    let bytes = Arc::new(bytes);
    // What it holds now decides what to do; the new object is compressed only when it is put.
    let (read, list_now, owned_key) = (Arc::clone(&bytes), Arc::clone(list), key.to_string());
    let held = tokio::task::spawn_blocking(move || {
        filter_object(&owned_key, &read, dead_letter, &list_now, None)
    })
    .await
    .expect("object reading thread");
    let held = match held {
        Ok(held) => held,
        Err(err) => return Ok(Outcome::LeftAlone(format!("{key}: cannot be read ({err})"))),
    };
    if held.old == rewrite.new {
        return Ok(Outcome::Already(Recorded {
            from: rewrite.old.clone(),
            to: rewrite.new.clone(),
            compressed_bytes: size,
            ids: held.kept_ids,
        }));
    }
    if held.removed() == 0 {
        return Ok(Outcome::Clean);
    }
    // Another request may have rewritten it since it was read: taken from what it holds now.
    let (owned_key, list, path_owned, pledged) = (
        key.to_string(),
        Arc::clone(list),
        path.to_path_buf(),
        held.new.uncompressed_bytes,
    );
    let written = tokio::task::spawn_blocking(move || {
        let file = layout::create_private_file(&path_owned)
            .map_err(|err| format!("cannot write {}: {err}", path_owned.display()))?;
        let written = filter_object(
            &owned_key,
            &bytes,
            dead_letter,
            &list,
            Some((file, levels, Some(pledged))),
        )?;
        let len = std::fs::metadata(&path_owned)
            .map_err(|err| format!("cannot read {}: {err}", path_owned.display()))?
            .len();
        Ok::<_, String>((written, len))
    })
    .await
    .expect("object rewriting thread");
    let (written, len) = match written {
        Ok(written) => written,
        Err(err) => return Ok(Outcome::LeftAlone(format!("{key}: not rewritten ({err})"))),
    };
    let (batch_start, batch_end) = match rewrite.manifest.as_deref() {
        Some(manifest) => layout::manifest_range(manifest).unwrap_or((first_offset, first_offset)),
        None => stray_batch(store, key, first_offset).await?,
    };
    let metadata = ObjectMetadata {
        topic: topic.to_string(),
        partition,
        batch_start,
        batch_end,
        first_offset,
        record_count: written.new.records,
        content_crc32: u32::from_str_radix(&written.new.crc32, 16).unwrap_or_default(),
        codec: Codec::of_key(key).unwrap_or(Codec::Gzip),
    };
    let always = || true;
    s3(|| store.put_file_once(key, path, len, &metadata, false, &always)).await?;
    Ok(Outcome::Put(Recorded {
        from: written.old,
        to: written.new,
        compressed_bytes: len,
        ids: written.kept_ids,
    }))
}

/// Deletes the earlier versions of a rewritten object, which hold what it held; answers how
/// many it deleted and each it could not, with why (denied, or under Object Lock).
async fn delete_earlier_versions<S: ObjectStore>(store: &S, key: &str) -> (u64, Vec<String>) {
    let versions = match s3(|| store.noncurrent_versions(key)).await {
        Ok(versions) => versions,
        Err(err) if err.code.as_deref() == Some("NotImplemented") => return (0, Vec::new()),
        Err(err) => {
            return (
                0,
                vec![format!(
                    "{key}: its earlier versions cannot be listed ({err}) and may still hold the users' events (forget needs s3:ListBucketVersions)"
                )],
            )
        }
    };
    let (mut deleted, mut kept) = (0, Vec::new());
    for version in versions {
        match s3(|| store.delete_version(key, &version)).await {
            Ok(()) => deleted += 1,
            Err(err) => kept.push(format!(
                "{key} version {version}: still holds the users' events, not deleted ({err}; forget needs s3:DeleteObjectVersion, and a version under Object Lock can be deleted only when its retention ends)"
            )),
        }
    }
    (deleted, kept)
}

/// The batch an object no manifest covers says it belongs to.
async fn stray_batch<S: ObjectStore>(
    store: &S,
    key: &str,
    first_offset: i64,
) -> Result<(i64, i64), S3Error> {
    let metadata = s3(|| store.head_metadata(key)).await?.unwrap_or_default();
    let field = |name: &str| metadata.get(name).and_then(|v| v.parse().ok());
    Ok((
        field("batch-start").unwrap_or(first_offset),
        field("batch-end").unwrap_or(first_offset),
    ))
}

/// Makes the id index of a batch answer for its rewritten objects as they are now: the
/// forgotten users are no longer in it (a filter can be probed with a guessed id).
async fn update_index<S: ObjectStore>(
    store: &S,
    prefix: &str,
    topic: &str,
    manifest_key: &str,
    rewritten: &[(&str, Recorded)],
) -> Result<(), String> {
    let Some(key) = crate::index::index_of_manifest(prefix, topic, manifest_key) else {
        return Ok(());
    };
    let failed = |err: &dyn std::fmt::Display| {
        format!("{key}: not updated ({err}); it may still answer for the forgotten users until the same forget is run again")
    };
    let Some(bytes) = s3(|| store.get_bytes(&key)).await.map_err(|e| failed(&e))? else {
        return Ok(());
    };
    let entries: Vec<(String, crate::index::IdFilter)> = rewritten
        .iter()
        .map(|(object, recorded)| (object.to_string(), recorded.ids.clone()))
        .collect();
    // Parsing and encoding filters is CPU work: off the async threads.
    let body = tokio::task::spawn_blocking(move || {
        let mut index: crate::index::BatchIndex = serde_json::from_slice(&bytes).ok()?;
        let mut changed = false;
        for (object, filter) in entries {
            changed |= index.replace(&object, &filter);
        }
        changed.then(|| index.to_json())
    })
    .await
    .expect("index thread");
    match body {
        Some(body) => s3(|| store.put_bytes(&key, body.clone(), "application/json"))
            .await
            .map_err(|e| failed(&e)),
        None => Ok(()),
    }
}

/// Records the rewritten objects in their batch manifest: each entry (of its files, or of those
/// it says may appear) that still describes an object as it was describes it as it is, with
/// the lines taken out counted as `forgotten`. Answers whether the manifest changed, or why it
/// could not be updated.
async fn update_manifest<S: ObjectStore>(
    store: &S,
    key: &str,
    rewritten: &[(&str, Recorded)],
) -> Result<bool, String> {
    let failed = |err: &dyn std::fmt::Display| {
        format!("{key}: not updated ({err}); its rewritten objects hold fewer lines than it says until the same forget is run again")
    };
    let bytes = match s3(|| store.get_bytes(key)).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(failed(&"the manifest is gone")),
        Err(err) => return Err(failed(&err)),
    };
    let mut manifest = serde_json::from_slice::<Manifest>(&bytes).map_err(|err| failed(&err))?;
    let mut changed = false;
    for (object, recorded) in rewritten {
        let entry = manifest
            .files
            .iter_mut()
            .chain(manifest.may_appear.iter_mut())
            .find(|file| file.key == *object)
            .filter(|file| {
                file.records == recorded.from.records && file.crc32 == recorded.from.crc32
            });
        if let Some(entry) = entry {
            entry.records = recorded.to.records;
            entry.uncompressed_bytes = recorded.to.uncompressed_bytes;
            entry.compressed_bytes = recorded.compressed_bytes;
            entry.crc32 = recorded.to.crc32.clone();
            entry.forgotten += recorded.from.records - recorded.to.records;
            changed = true;
        }
    }
    if changed {
        manifest.records = manifest.files.iter().map(|f| f.records).sum();
        s3(|| store.put_bytes(key, manifest.to_json(), "application/json"))
            .await
            .map_err(|err| failed(&err))?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::checkpoint::{Gap, GapCause};
    use crate::retry::ErrorClass;
    use crate::suppress::hash_id;
    use crate::upload::manifest::ManifestFile;
    use crate::upload::s3::{PutOutcome, StillOurs};

    /// An object's body and `x-amz-meta-*` fields.
    type Stored = (Vec<u8>, HashMap<String, String>);
    /// An earlier version of an object: its id and body.
    type Version = (String, Vec<u8>);

    /// A bucket that counts every put per key and, like a kill, fails every request after a
    /// number of writes.
    #[derive(Default)]
    struct Bucket {
        objects: Mutex<BTreeMap<String, Stored>>,
        puts: Mutex<HashMap<String, u32>>,
        writes_left: AtomicI64,
        /// Earlier versions of each key (version id, body) when `versioned`.
        versions: Mutex<HashMap<String, Vec<Version>>>,
        versioned: bool,
        deny_version_deletes: bool,
    }

    impl Bucket {
        fn write(&self, key: &str) -> Result<(), S3Error> {
            if self.writes_left.fetch_sub(1, Ordering::SeqCst) <= 0 {
                return Err(S3Error {
                    operation: "PutObject",
                    bucket: "b".into(),
                    key: key.into(),
                    class: ErrorClass::Permanent,
                    code: None,
                    message: "killed".into(),
                });
            }
            *self.puts.lock().unwrap().entry(key.into()).or_default() += 1;
            Ok(())
        }

        fn get(&self, key: &str) -> Vec<u8> {
            self.objects.lock().unwrap()[key].0.clone()
        }
    }

    impl ObjectStore for Bucket {
        fn conditional_writes(&self) -> bool {
            true
        }
        async fn head_metadata(
            &self,
            key: &str,
        ) -> Result<Option<HashMap<String, String>>, S3Error> {
            Ok(self.objects.lock().unwrap().get(key).map(|o| o.1.clone()))
        }
        async fn put_file_once(
            &self,
            key: &str,
            path: &Path,
            _len: u64,
            metadata: &ObjectMetadata,
            _conditional: bool,
            _still_ours: StillOurs<'_>,
        ) -> Result<PutOutcome, S3Error> {
            self.write(key)?;
            let fields = HashMap::from([
                ("record-count".into(), metadata.record_count.to_string()),
                (
                    "content-crc32".into(),
                    format!("{:08x}", metadata.content_crc32),
                ),
            ]);
            let body = std::fs::read(path).unwrap();
            let earlier = self
                .objects
                .lock()
                .unwrap()
                .insert(key.into(), (body, fields));
            if let Some((body, _)) = earlier.filter(|_| self.versioned) {
                let mut versions = self.versions.lock().unwrap();
                let list = versions.entry(key.into()).or_default();
                list.push((format!("v{}", list.len()), body));
            }
            Ok(PutOutcome::Written)
        }
        async fn keeps_versions(&self) -> Result<bool, S3Error> {
            Ok(self.versioned)
        }
        async fn noncurrent_versions(&self, key: &str) -> Result<Vec<String>, S3Error> {
            let versions = self.versions.lock().unwrap();
            Ok(versions
                .get(key)
                .map(|list| list.iter().map(|(id, _)| id.clone()).collect())
                .unwrap_or_default())
        }
        async fn delete_version(&self, key: &str, version: &str) -> Result<(), S3Error> {
            if self.deny_version_deletes {
                return Err(S3Error {
                    operation: "DeleteObject",
                    bucket: "b".into(),
                    key: key.into(),
                    class: ErrorClass::Permanent,
                    code: Some("AccessDenied".into()),
                    message: "denied".into(),
                });
            }
            let mut versions = self.versions.lock().unwrap();
            versions
                .get_mut(key)
                .unwrap()
                .retain(|(id, _)| id != version);
            Ok(())
        }
        async fn put_bytes(&self, key: &str, bytes: Vec<u8>, _: &str) -> Result<(), S3Error> {
            self.write(key)?;
            self.objects
                .lock()
                .unwrap()
                .insert(key.into(), (bytes, HashMap::new()));
            Ok(())
        }
        async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
            Ok(self.objects.lock().unwrap().get(key).map(|o| o.0.clone()))
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, S3Error> {
            let objects = self.objects.lock().unwrap();
            Ok(objects
                .iter()
                .filter(|(key, _)| key.starts_with(prefix))
                .map(|(key, o)| (key.clone(), o.0.len() as i64))
                .collect())
        }
    }

    fn compress(key: &str, text: &str) -> Vec<u8> {
        if key.ends_with(".zst") {
            return zstd::encode_all(text.as_bytes(), 3).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap()
    }

    fn event(user: &str, n: u32) -> String {
        format!("{{\"userId\":\"{user}\",\"messageId\":\"m{n}\"}}\n")
    }

    fn letter(key: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        format!(
            "{{\"reason\":\"no-source\",\"key_base64\":\"{b64}\",\"payload_base64\":\"e30=\"}}\n"
        )
    }

    const DAY: &str = "2026-03-01";

    /// Two committed batches of partition 0 (events in gzip and zstd, a dead letter) and an
    /// uncommitted one of partition 1; the users to forget are `gone` and `gone-too`.
    fn archive() -> Bucket {
        let bucket = Bucket::default();
        let batch = |partition: i32, start: i64, end: i64, files: Vec<(String, i64, String)>| {
            let mut entries = Vec::new();
            let indexed: Vec<(String, String)> = files
                .iter()
                .map(|(k, _, t)| (k.clone(), t.clone()))
                .collect();
            for (key, first_offset, text) in files {
                let bytes = compress(&key, &text);
                entries.push(ManifestFile {
                    key: key.clone(),
                    first_offset,
                    records: text.lines().count() as u64,
                    uncompressed_bytes: text.len() as u64,
                    compressed_bytes: bytes.len() as u64,
                    crc32: format!("{:08x}", crc32fast::hash(text.as_bytes())),
                    deleted_from_kafka: 0,
                    forgotten: 0,
                });
                bucket
                    .objects
                    .lock()
                    .unwrap()
                    .insert(key, (bytes, HashMap::new()));
            }
            let records: u64 = entries.iter().map(|f| f.records).sum();
            let gap = (end - start + 1) as u64 - records;
            // The id index the archiver puts with the batch.
            let mut index = crate::index::BatchIndex::new();
            for (key, text) in &indexed {
                let mut filter = crate::index::IdFilter::default();
                for line in text.lines() {
                    let ids = if key.contains("_dead-letter") {
                        crate::suppress::dead_letter_ids(line.as_bytes())
                    } else {
                        crate::suppress::top_level_ids(line.as_bytes())
                    };
                    for id in ids {
                        filter.insert(crate::suppress::key_of(&id));
                    }
                }
                index.add(key.clone(), &filter);
            }
            let index_key = crate::index::index_key("", "t", partition, start, end);
            bucket
                .objects
                .lock()
                .unwrap()
                .insert(index_key, (index.to_json(), HashMap::new()));
            let manifest = Manifest {
                version: 2,
                topic: "t".into(),
                partition,
                start,
                end,
                records,
                files: entries,
                gaps: (gap > 0)
                    .then(|| Gap {
                        first: end - gap as i64 + 1,
                        last: end,
                        cause: GapCause::Suppressed,
                    })
                    .into_iter()
                    .collect(),
                may_appear: Vec::new(),
            };
            let key = manifest.key("");
            bucket
                .objects
                .lock()
                .unwrap()
                .insert(key, (manifest.to_json(), HashMap::new()));
        };
        let key = |folder: &str, partition: i32, offset: i64, ext: &str| {
            format!("segment-logs/{folder}/{DAY}/t-{partition}-{offset:020}.{ext}")
        };
        batch(
            0,
            0,
            6,
            vec![
                (
                    key("s1", 0, 0, "gz"),
                    0,
                    event("gone", 0) + &event("kept", 2) + &event("gone", 4),
                ),
                (
                    key("s2", 0, 1, "zst"),
                    1,
                    event("kept", 1) + &event("gone-too", 3) + &event("gone", 6),
                ),
                (key("_dead-letter/t", 0, 5, "gz"), 5, letter("gone")),
            ],
        );
        batch(
            0,
            7,
            9,
            vec![(
                key("s1", 0, 7, "gz"),
                7,
                event("kept", 7) + &event("kept", 8),
            )],
        );
        batch(
            1,
            0,
            1,
            vec![(
                key("s1", 1, 0, "gz"),
                0,
                event("gone", 0) + &event("kept", 1),
            )],
        );
        bucket
    }

    fn options() -> ForgetOptions {
        ForgetOptions {
            ids: BTreeSet::from([hash_id("gone"), hash_id("gone-too")]),
            selection: ForgetSelection::default(),
            dry_run: false,
            wait_limit: None,
            work_dir: Some(std::env::temp_dir().join(format!("ksa-forget-{}", fastrand::u64(..)))),
            concurrency: 3,
            finish: None,
        }
    }

    /// One run of the request against the bucket as `forget` runs it once nothing is open.
    async fn run(bucket: &Bucket, options: &ForgetOptions) -> Result<ForgetSummary, ForgetError> {
        let request = request_id("", "t", &options.ids, &options.selection);
        let stored = stored_journal(bucket, "", &request, &options.ids).await?;
        let context = RequestContext {
            prefix: "",
            topic: "t",
            request: &request,
            options,
            levels: Levels { gzip: 6, zstd: 3 },
            suppressed_since: None,
            started: Utc::now(),
        };
        let committed = HashMap::from([(0, 10), (1, 0)]);
        let mut summary = ForgetSummary {
            request: request.clone(),
            ..ForgetSummary::default()
        };
        in_bucket(bucket, &context, stored, &committed, &mut summary, &|_| {}).await?;
        Ok(summary)
    }

    fn lines_of(bucket: &Bucket, key: &str) -> String {
        let bytes = bucket.get(key);
        let mut decoded = crate::object::decode_object(key, &bytes).unwrap();
        let mut text = String::new();
        decoded.content().read_to_string(&mut text).unwrap();
        text
    }

    /// What every run must end with, however many were killed before it.
    fn assert_forgotten(bucket: &Bucket) {
        let objects: Vec<String> = bucket.objects.lock().unwrap().keys().cloned().collect();
        for key in objects.iter().filter(|k| k.contains("/t-0-")) {
            let text = lines_of(bucket, key);
            assert!(
                !text.contains("\"gone") && !text.contains("Z29uZ"),
                "{key}: {text}"
            );
        }
        let first = bucket
            .get("segment-logs/_manifests/t/0/00000000000000000000-00000000000000000006.json");
        let manifest: Manifest = serde_json::from_slice(&first).unwrap();
        assert_eq!(manifest.unaccounted_offsets(), Some(0), "{manifest:?}");
        assert_eq!(manifest.files.iter().map(|f| f.forgotten).sum::<u64>(), 5);
        for file in &manifest.files {
            let held = content_of(bucket, &file.key);
            assert_eq!(
                (held.records, held.crc32),
                (file.records, file.crc32.clone())
            );
            assert_eq!(held.uncompressed_bytes, file.uncompressed_bytes);
            assert_eq!(file.compressed_bytes, bucket.get(&file.key).len() as u64);
        }
        // The uncommitted batch of partition 1 is not touched.
        assert!(
            lines_of(bucket, &format!("segment-logs/s1/{DAY}/t-1-{:020}.gz", 0)).contains("gone")
        );
        // Nothing is put twice, however many runs it took.
        for (key, puts) in bucket.puts.lock().unwrap().iter() {
            if key.contains("/t-") {
                assert_eq!(*puts, 1, "{key} was put {puts} times");
            }
        }
    }

    /// What an object holds, read as `verify` reads it.
    fn content_of(bucket: &Bucket, key: &str) -> rewrite::Content {
        let nobody = Suppression::new([]);
        filter_object(key, &bucket.get(key), false, &nobody, None)
            .unwrap()
            .old
    }

    /// Between two runs, every object and its manifest entry agree, or its journal explains
    /// them (as `verify` says).
    fn assert_explained(bucket: &Bucket, options: &ForgetOptions) -> usize {
        let request = request_id("", "t", &options.ids, &options.selection);
        let journal: Option<Journal> = bucket
            .objects
            .lock()
            .unwrap()
            .get(&journal_key("", &request))
            .map(|o| serde_json::from_slice(&o.0).unwrap());
        let journaled: journal::Journaled = journal
            .into_iter()
            .flat_map(|j| j.rewrites)
            .map(|r| (r.key.clone(), vec![(request.clone(), r)]))
            .collect();
        let manifests: Vec<Manifest> = bucket
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("segment-logs/_manifests/t/"))
            .map(|(_, o)| serde_json::from_slice(&o.0).unwrap())
            .collect();
        let mut unfinished = 0;
        for file in manifests.iter().flat_map(|m| &m.files) {
            let expected = (file.records, file.crc32.clone());
            let held = content_of(bucket, &file.key);
            if (held.records, &held.crc32) == (expected.0, &expected.1) {
                continue;
            }
            let explained = journal::unfinished(
                &journaled,
                &file.key,
                &expected,
                (held.records, &held.crc32),
            );
            assert!(
                explained.is_some(),
                "{}: {held:?} against {expected:?}",
                file.key
            );
            unfinished += 1;
        }
        unfinished
    }

    #[tokio::test]
    async fn a_request_rewrites_each_object_holding_the_users_and_its_manifest() {
        let bucket = archive();
        bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
        let options = options();
        let summary = run(&bucket, &options).await.unwrap();
        // Four objects in the selection; the index says one holds neither user.
        assert_eq!(summary.objects_in_selection, 4);
        assert_eq!(
            (
                summary.objects_read,
                summary.objects_holding,
                summary.lines_removed
            ),
            (3, 3, 5)
        );
        assert_eq!(
            (summary.objects_rewritten, summary.manifests_updated),
            (3, 1)
        );
        assert!(summary.left_alone.is_empty(), "{:?}", summary.left_alone);
        assert_forgotten(&bucket);
        assert_eq!(
            lines_of(&bucket, &format!("segment-logs/s1/{DAY}/t-0-{:020}.gz", 0)),
            event("kept", 2)
        );
        // The index answers for the objects as they are now: not for the forgotten users.
        let index: crate::index::BatchIndex =
            serde_json::from_slice(&bucket.get(&crate::index::index_key("", "t", 0, 0, 6)))
                .unwrap();
        let s1 = format!("segment-logs/s1/{DAY}/t-0-{:020}.gz", 0);
        let gone = [
            crate::suppress::key_of("gone"),
            crate::suppress::key_of("gone-too"),
        ];
        assert!(!index.may_hold(&s1, &gone));
        assert!(index.may_hold(&s1, &[crate::suppress::key_of("kept")]));
        let audit = bucket.get(&audit_key("", &summary.request));
        let audit = String::from_utf8(audit).unwrap();
        assert!(!audit.contains("\"gone\"") && audit.contains(&hash_id("gone").sha256_hex()));
        // Run again: everything is found done, nothing is put.
        let again = run(&bucket, &options).await.unwrap();
        assert_eq!(
            (again.objects_rewritten, again.objects_already_rewritten),
            (0, 3)
        );
        assert!(again.resumed);
        assert_forgotten(&bucket);
    }

    #[tokio::test]
    async fn a_request_killed_at_any_write_and_run_again_rewrites_each_object_once() {
        let options = options();
        let mut unfinished = 0;
        for kill_after in 0..9 {
            let bucket = archive();
            bucket.writes_left.store(kill_after, Ordering::SeqCst);
            let first = run(&bucket, &options).await;
            bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
            unfinished += assert_explained(&bucket, &options);
            let second = run(&bucket, &options).await.unwrap();
            assert!(
                second.left_alone.is_empty(),
                "kill after {kill_after}: {second:?}"
            );
            assert_forgotten(&bucket);
            if kill_after >= 7 {
                assert!(
                    first.is_ok(),
                    "a whole run is 7 writes: journal, 3 objects, index, manifest, audit"
                );
            }
        }
        assert!(
            unfinished > 0,
            "some kill fell between an object and its manifest"
        );
    }

    /// Requests run one at a time: another is refused while one is unfinished. Should two race
    /// past that check (both read before either journals), the one resumed later takes out what
    /// is left of its users from what the objects hold now, and the manifests still account
    /// for every line.
    #[tokio::test]
    async fn a_request_resumed_after_another_rewrote_its_objects_takes_out_what_is_left() {
        let bucket = archive();
        let both = options();
        let one = ForgetOptions {
            ids: BTreeSet::from([hash_id("gone")]),
            ..options()
        };
        bucket.writes_left.store(1, Ordering::SeqCst);
        assert!(
            run(&bucket, &both).await.is_err(),
            "killed after its journal"
        );
        bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
        let refused = run(&bucket, &one).await;
        assert!(
            matches!(refused, Err(ForgetError::OtherUnfinished { .. })),
            "{refused:?}"
        );
        // The race: the other request runs as if it had looked before the journal was stored.
        let key = journal_key("", &request_id("", "t", &both.ids, &both.selection));
        let journal = bucket.objects.lock().unwrap().remove(&key).unwrap();
        let first = run(&bucket, &one).await.unwrap();
        assert_eq!(first.objects_rewritten, 3);
        bucket.objects.lock().unwrap().insert(key, journal);
        let resumed = run(&bucket, &both).await.unwrap();
        assert!(resumed.left_alone.is_empty(), "{:?}", resumed.left_alone);
        // The zstd object held both users: the other request took `gone` out, this one
        // `gone-too`; the gzip object and the dead letter hold neither any more.
        assert_eq!(
            (resumed.objects_rewritten, resumed.objects_already_rewritten),
            (1, 2)
        );
        let zst = format!("segment-logs/s2/{DAY}/t-0-{:020}.zst", 1);
        assert_eq!(lines_of(&bucket, &zst), event("kept", 1));
        let manifest: Manifest = serde_json::from_slice(
            &bucket
                .get("segment-logs/_manifests/t/0/00000000000000000000-00000000000000000006.json"),
        )
        .unwrap();
        assert_eq!(manifest.unaccounted_offsets(), Some(0), "{manifest:?}");
        assert_eq!(manifest.files.iter().map(|f| f.forgotten).sum::<u64>(), 5);
        for file in &manifest.files {
            let held = content_of(&bucket, &file.key);
            assert_eq!((held.records, &held.crc32), (file.records, &file.crc32));
        }
    }

    /// With the batches' id index, a request reads only the objects that may hold its users.
    #[tokio::test]
    async fn the_id_index_keeps_a_request_from_reading_objects_without_its_users() {
        let bucket = archive();
        bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
        let options = ForgetOptions {
            ids: BTreeSet::from([hash_id("gone-too")]),
            ..options()
        };
        let summary = run(&bucket, &options).await.unwrap();
        assert_eq!(
            (
                summary.objects_in_selection,
                summary.objects_read,
                summary.lines_removed
            ),
            (4, 1, 1),
            "only the zstd object holds gone-too"
        );
        assert!(
            !lines_of(&bucket, &format!("segment-logs/s2/{DAY}/t-0-{:020}.zst", 1))
                .contains("gone-too")
        );
    }

    #[tokio::test]
    async fn on_a_versioned_bucket_the_earlier_versions_of_rewritten_objects_are_deleted_or_named()
    {
        let options = options();
        let mut bucket = archive();
        bucket.versioned = true;
        bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
        let summary = run(&bucket, &options).await.unwrap();
        assert_eq!(summary.versions_deleted, 3);
        assert!(summary.left_alone.is_empty(), "{:?}", summary.left_alone);
        assert!(bucket.versions.lock().unwrap().values().all(Vec::is_empty));

        let mut bucket = archive();
        bucket.versioned = true;
        bucket.deny_version_deletes = true;
        bucket.writes_left.store(i64::MAX, Ordering::SeqCst);
        let summary = run(&bucket, &options).await.unwrap();
        assert_eq!(summary.versions_deleted, 0);
        assert_eq!(summary.left_alone.len(), 3, "{:?}", summary.left_alone);
        assert!(summary.left_alone[0].contains("version v0: still holds the users' events"));
    }

    #[test]
    fn only_objects_of_committed_batches_in_the_selection_are_read() {
        let bucket = archive();
        let listing: Vec<(String, i64)> = bucket
            .objects
            .lock()
            .unwrap()
            .iter()
            .map(|(k, o)| (k.clone(), o.0.len() as i64))
            .collect();
        let committed = HashMap::from([(0, 7), (1, 0)]);
        let (all, uncommitted) =
            candidates("", "t", &listing, &ForgetSelection::default(), &committed);
        assert_eq!(uncommitted, BTreeMap::new());
        let keys: Vec<&str> = all.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys.len(),
            3,
            "batch 6..=9 and partition 1 are not committed: {keys:?}"
        );
        assert!(all.iter().all(|c| c.manifest.is_some()));
        assert_eq!(all.iter().filter(|c| c.dead_letter).count(), 1);
        let one_source = ForgetSelection {
            sources: BTreeSet::from(["s2".to_string()]),
            ..ForgetSelection::default()
        };
        let (some, _) = candidates("", "t", &listing, &one_source, &committed);
        assert_eq!(some.len(), 2, "s2's object and the dead letter");
        let (_, uncommitted) = candidates("", "t", &listing, &one_source, &HashMap::new());
        assert_eq!(
            uncommitted,
            BTreeMap::from([(0, 2)]),
            "partition 1 holds no s2 object"
        );
    }
}
