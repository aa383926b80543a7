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
use crate::consume::lag::{group_lag, LagError, PartitionLag};
use crate::layout::{self, Codec};
use crate::restore::plan::{place, ManifestRanges};
use crate::restore::s3;
use crate::suppress::{list_key, IdHash, Request, Suppression};
use crate::upload::manifest::Manifest;
use crate::upload::s3::{ObjectMetadata, S3Error, S3Store};
use crate::upload::store::ObjectStore;
use journal::{audit_key, journal_key, request_id, Audit, ForgetSelection, Journal, Rewrite};
use rewrite::{filter_object, Levels};
use wait::{judge, IntentView, PartitionView, Waiting};

/// Objects read or rewritten at once, unless the operator says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// How often the wait looks again.
const WAIT_POLL: Duration = Duration::from_secs(5);

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
    /// Objects holding the users' events that were not rewritten, each with why.
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
    #[error("gave up waiting after {secs} s (the ids are suppressed; run the same forget again to finish): {waiting}")]
    StillWaiting { secs: u64, waiting: String },
}

/// Runs a request to its end: suppress, wait, read, journal, rewrite, audit (see the module
/// doc). `say` hears progress, one line at a time.
pub async fn forget(
    config: &Config,
    options: ForgetOptions,
    say: &(dyn Fn(String) + Sync),
) -> Result<ForgetSummary, ForgetError> {
    if options.ids.is_empty() {
        return Err(ForgetError::NoIds);
    }
    let store = S3Store::connect(&config.s3).await;
    let prefix = config.s3.prefix.as_str();
    let topic = config.kafka.topic.as_str();
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
            say(format!(
                "request {request}: going on from its journal ({} objects to rewrite)",
                journal.rewrites.len()
            ));
            let since = find_suppression(&store, prefix, &request).await?;
            (HashMap::new(), since)
        }
        None if options.dry_run => {
            let views = partition_views(config, &store, &options.ids).await?;
            summary.waiting = views
                .iter()
                .filter_map(|(view, _)| {
                    judge(view, false)
                        .err()
                        .filter(|w| *w != Waiting::MembersReading)
                        .map(|w| format!("partition {}: {w}", view.partition))
                })
                .collect();
            (committed_of(&views), None)
        }
        None => {
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
    say: &(dyn Fn(String) + Sync),
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
            let candidates = candidates(prefix, topic, &listing, &options.selection, committed);
            summary.objects_in_selection = candidates.len() as u64;
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
            };
            if !options.dry_run {
                // Before the first rewrite: a rerun finishes from it, `verify` explains with it.
                let key = journal_key(prefix, request);
                s3(|| store.put_bytes(&key, journal.to_json(), "application/json")).await?;
                say(format!(
                    "journal stored ({key}): {} objects to rewrite",
                    journal.rewrites.len()
                ));
            }
            journal
        }
    };
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
    make_private_dir(&work_dir)?;
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
    let _ = std::fs::remove_dir_all(&work_dir);
    let applied = applied?;
    summary.objects_rewritten = applied.rewritten;
    summary.objects_already_rewritten = applied.already;
    summary.manifests_updated = applied.manifests_updated;
    summary.left_alone.extend(applied.left_alone);

    let audit = Audit {
        request: request.to_string(),
        suppressed_since: context.suppressed_since,
        started: context.started,
        finished: Utc::now(),
        id_sha256s: options.ids.iter().map(IdHash::sha256_hex).collect(),
        selection: options.selection.clone(),
        objects_read: summary.objects_read,
        bytes_read: summary.bytes_read,
        objects_rewritten: summary.objects_rewritten + summary.objects_already_rewritten,
        lines_removed: summary.lines_removed,
        manifests_updated: summary.manifests_updated,
        left_alone: summary.left_alone.clone(),
    };
    let key = audit_key(prefix, request);
    s3(|| store.put_bytes(&key, audit.to_json(), "application/json")).await?;
    summary.audit_key = Some(key);
    Ok(())
}

fn read_journal(
    request: &str,
    key: &str,
    bytes: &[u8],
    ids: &BTreeSet<IdHash>,
) -> Result<Journal, ForgetError> {
    let bad = |message: String| ForgetError::BadJournal {
        request: request.to_string(),
        key: key.to_string(),
        message,
    };
    let journal: Journal = serde_json::from_slice(bytes).map_err(|err| bad(err.to_string()))?;
    let ours: Vec<String> = ids.iter().map(IdHash::encode).collect();
    if journal.ids != ours {
        return Err(bad("it forgets other ids than these".into()));
    }
    Ok(journal)
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
    say: &(dyn Fn(String) + Sync),
) -> Result<DateTime<Utc>, S3Error> {
    if let Some(since) = find_suppression(store, prefix, request).await? {
        return Ok(since);
    }
    let (made, key) =
        s3(|| crate::upload::suppression::submit_named(store, prefix, ids, request.to_string()))
            .await?;
    say(format!(
        "{} ids added to the suppression list ({key}): nothing new of theirs is archived from each partition's next batch",
        ids.len()
    ));
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
    let lags: Vec<PartitionLag> = tokio::task::spawn_blocking(move || group_lag(&kafka_config))
        .await
        .expect("kafka lookup thread")?;
    let prefix = &config.s3.prefix;
    let mut lists: HashMap<String, bool> = HashMap::new();
    let mut views = Vec::new();
    for lag in lags {
        let key = layout::intent_key(prefix, &config.kafka.topic, lag.partition);
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
    say: &(dyn Fn(String) + Sync),
) -> Result<HashMap<i32, i64>, ForgetError> {
    // Twice a member's refresh period: one to read the request, one of margin for a slow read.
    let refresh = chrono::Duration::seconds(2 * config.suppression.refresh_secs as i64);
    let started = Instant::now();
    let mut said = String::new();
    loop {
        let views = partition_views(config, store, &options.ids).await?;
        let members_read = Utc::now() >= since + refresh;
        let waiting: Vec<String> = views
            .iter()
            .filter_map(|(view, _)| {
                judge(view, members_read)
                    .err()
                    .map(|w| format!("partition {}: {w}", view.partition))
            })
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
            say(format!("waiting: {now_waiting}"));
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
pub fn candidates(
    prefix: &str,
    topic: &str,
    listing: &[(String, i64)],
    selection: &ForgetSelection,
    committed: &HashMap<i32, i64>,
) -> Vec<Candidate> {
    let root = format!("{prefix}{}/", layout::ROOT);
    let manifests = ManifestRanges::of(prefix, topic, listing);
    listing
        .iter()
        .filter_map(|(key, size)| {
            let (source, day, partition, first_offset) = place(&root, topic, key)?;
            let committed = *committed.get(&partition)?;
            let manifest = manifests.covering(key);
            // A batch is committed whole; an object no manifest covers, by its first line.
            let last = manifest
                .and_then(layout::manifest_range)
                .map_or(first_offset, |(_, end)| end);
            let covered = selection.covers(source.as_deref(), day) && last < committed;
            covered.then(|| Candidate {
                key: key.clone(),
                size: *size,
                manifest: manifest.map(str::to_string),
                dead_letter: source.is_none(),
            })
        })
        .collect()
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
    say: &(dyn Fn(String) + Sync),
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
    let mut last_said = Instant::now();
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
        if last_said.elapsed() >= Duration::from_secs(2) {
            say(format!(
                "read {}/{} objects ({} MB), {} hold the users' events",
                found.objects_read,
                candidates.len(),
                found.bytes_read / 1_000_000,
                found.rewrites.len()
            ));
            last_said = Instant::now();
        }
    }
    Ok(found)
}

/// What rewriting the journal's objects did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub rewritten: u64,
    pub already: u64,
    pub manifests_updated: u64,
    pub left_alone: Vec<String>,
}

/// What one object was found holding, and what became of it.
enum Outcome {
    /// Put without the lines; its size.
    Put(u64),
    /// An earlier run put it; its size.
    Already(u64),
    LeftAlone(String),
}

/// Rewrites every object of `journal` that does not hold its new content yet, then updates
/// each batch manifest whose objects are all rewritten.
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
    say: &(dyn Fn(String) + Sync),
) -> Result<Applied, ForgetError> {
    let root = format!("{prefix}{}/", layout::ROOT);
    let mut applied = Applied::default();
    let mut done: BTreeMap<&str, Vec<(&Rewrite, u64)>> = BTreeMap::new();
    let mut rewrites = futures_util::stream::iter(journal.rewrites.iter().enumerate())
        .map(|(index, rewrite)| {
            let path = work_dir.join(format!("{index}.part"));
            let root = root.as_str();
            async move {
                let outcome = rewrite_one(store, root, topic, rewrite, list, levels, &path).await;
                let _ = tokio::fs::remove_file(&path).await;
                (rewrite, outcome)
            }
        })
        .buffer_unordered(concurrency);
    let mut last_said = Instant::now();
    while let Some((rewrite, outcome)) = rewrites.next().await {
        let size = match outcome? {
            Outcome::Put(size) => {
                applied.rewritten += 1;
                size
            }
            Outcome::Already(size) => {
                applied.already += 1;
                size
            }
            Outcome::LeftAlone(why) => {
                // Its manifest entry stays as it is: `verify` reports the object.
                applied.left_alone.push(why);
                continue;
            }
        };
        if let Some(manifest) = &rewrite.manifest {
            done.entry(manifest).or_default().push((rewrite, size));
        }
        if last_said.elapsed() >= Duration::from_secs(2) {
            say(format!(
                "rewrote {}/{} objects",
                applied.rewritten + applied.already,
                journal.rewrites.len()
            ));
            last_said = Instant::now();
        }
    }
    for (manifest_key, rewritten) in done {
        if update_manifest(store, manifest_key, &rewritten).await? {
            applied.manifests_updated += 1;
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
    let file = layout::create_private_file(path).map_err(|err| ForgetError::WorkDir {
        path: path.display().to_string(),
        message: err.to_string(),
    })?;
    let size = bytes.len() as u64;
    let (owned_key, list, pledged) = (
        key.to_string(),
        Arc::clone(list),
        rewrite.new.uncompressed_bytes,
    );
    let filtered = tokio::task::spawn_blocking(move || {
        filter_object(
            &owned_key,
            &bytes,
            source.is_none(),
            &list,
            Some((file, levels, Some(pledged))),
        )
    })
    .await
    .expect("object rewriting thread");
    let filtered = match filtered {
        Ok(filtered) => filtered,
        // The object as rewritten already fits the pledged size: only another one errs here.
        Err(err) => {
            return Ok(Outcome::LeftAlone(format!(
                "{key}: holds other lines than when it was read ({err})"
            )))
        }
    };
    if filtered.old == rewrite.new {
        return Ok(Outcome::Already(size));
    }
    if filtered.old != rewrite.old || filtered.new != rewrite.new {
        return Ok(Outcome::LeftAlone(format!(
            "{key}: holds other lines than when it was read"
        )));
    }
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
        record_count: rewrite.new.records,
        content_crc32: u32::from_str_radix(&rewrite.new.crc32, 16).unwrap_or_default(),
        codec: Codec::of_key(key).unwrap_or(Codec::Gzip),
    };
    let len = tokio::fs::metadata(path)
        .await
        .map_err(|err| ForgetError::WorkDir {
            path: path.display().to_string(),
            message: err.to_string(),
        })?
        .len();
    let always = || true;
    s3(|| store.put_file_once(key, path, len, &metadata, false, &always)).await?;
    Ok(Outcome::Put(len))
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

/// Records the rewritten objects in their batch manifest: each entry that still describes
/// the old content describes the new one, with the lines removed counted as `forgotten`.
/// Answers whether the manifest changed.
async fn update_manifest<S: ObjectStore>(
    store: &S,
    key: &str,
    rewritten: &[(&Rewrite, u64)],
) -> Result<bool, S3Error> {
    let Some(bytes) = s3(|| store.get_bytes(key)).await? else {
        return Ok(false);
    };
    let Ok(mut manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
        tracing::error!(
            key,
            "a batch manifest cannot be read: its rewritten objects are not recorded in it"
        );
        return Ok(false);
    };
    let mut changed = false;
    for (rewrite, size) in rewritten {
        let entry = manifest
            .files
            .iter_mut()
            .find(|file| file.key == rewrite.key)
            .filter(|file| file.records == rewrite.old.records && file.crc32 == rewrite.old.crc32);
        if let Some(entry) = entry {
            entry.records = rewrite.new.records;
            entry.uncompressed_bytes = rewrite.new.uncompressed_bytes;
            entry.compressed_bytes = *size;
            entry.crc32 = rewrite.new.crc32.clone();
            entry.forgotten += rewrite.removed();
            changed = true;
        }
    }
    if changed {
        manifest.records = manifest.files.iter().map(|f| f.records).sum();
        s3(|| store.put_bytes(key, manifest.to_json(), "application/json")).await?;
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

    /// A bucket that counts every put per key and, like a kill, fails every request after a
    /// number of writes.
    #[derive(Default)]
    struct Bucket {
        objects: Mutex<BTreeMap<String, Stored>>,
        puts: Mutex<HashMap<String, u32>>,
        writes_left: AtomicI64,
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
            self.objects
                .lock()
                .unwrap()
                .insert(key.into(), (body, fields));
            Ok(PutOutcome::Written)
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
            5,
            vec![
                (
                    key("s1", 0, 0, "gz"),
                    0,
                    event("gone", 0) + &event("kept", 2) + &event("gone", 4),
                ),
                (
                    key("s2", 0, 1, "zst"),
                    1,
                    event("kept", 1) + &event("gone-too", 3),
                ),
                (key("_dead-letter/t", 0, 5, "gz"), 5, letter("gone")),
            ],
        );
        batch(
            0,
            6,
            9,
            vec![(
                key("s1", 0, 6, "gz"),
                6,
                event("kept", 6) + &event("kept", 7),
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
            .get("segment-logs/_manifests/t/0/00000000000000000000-00000000000000000005.json");
        let manifest: Manifest = serde_json::from_slice(&first).unwrap();
        assert_eq!(manifest.unaccounted_offsets(), Some(0), "{manifest:?}");
        assert_eq!(manifest.files.iter().map(|f| f.forgotten).sum::<u64>(), 4);
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
            .map(|r| (r.key.clone(), (request.clone(), r)))
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
        assert_eq!(
            (
                summary.objects_read,
                summary.objects_holding,
                summary.lines_removed
            ),
            (4, 3, 4)
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
        for kill_after in 0..8 {
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
            if kill_after >= 6 {
                assert!(first.is_ok(), "a whole run is 6 writes");
            }
        }
        assert!(
            unfinished > 0,
            "some kill fell between an object and its manifest"
        );
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
        let committed = HashMap::from([(0, 6), (1, 0)]);
        let all = candidates("", "t", &listing, &ForgetSelection::default(), &committed);
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
        let some = candidates("", "t", &listing, &one_source, &committed);
        assert_eq!(some.len(), 2, "s2's object and the dead letter");
    }
}
