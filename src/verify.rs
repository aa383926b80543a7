//! Verify: checks what is in the bucket against the batch manifests and the group's committed
//! offsets, and reports every gap, overlap, missing or extra object and count mismatch per
//! partition. `deep` also downloads and decompresses every object (as one gzip member), checks
//! its line count and CRC32 against the manifest, and looks for duplicate `messageId`s.
//!
//! It only reads: it never deletes or rewrites anything. The judging is pure ([`analyze`],
//! [`inspect_object`]), fed by the listing, the manifests and the group's offsets; objects are
//! decompressed on blocking threads.

use std::collections::{BTreeMap, HashMap};

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::checkpoint::{Gap, GapCause};
use crate::config::Config;
use crate::consume::lag::{group_lag, LagError, PartitionLag};
use crate::forget::journal::{forget_prefix, unfinished, Journal, Journaled};
use crate::layout;
use crate::upload::manifest::Manifest;
use crate::upload::s3::S3Store;

/// Objects downloaded at once by a check.
const FETCH_CONCURRENCY: usize = 16;
/// KiB of objects downloaded and not yet checked, at most (a larger object goes alone): sixteen
/// objects of a few hundred megabytes each would be gigabytes.
const FETCH_KIB: u32 = 64 << 10;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `gap`, `overlap`, `missing-object`, `extra-object`, `count-mismatch`, `bad-manifest`,
    /// `corrupt-object`, `uncommitted-batch`, `duplicate-message-id`, `forget-unfinished`.
    pub kind: &'static str,
    pub partition: Option<i32>,
    pub detail: String,
}

/// What a partition looks like in the bucket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionSummary {
    pub partition: i32,
    pub batches: usize,
    /// First and last offset covered by manifests.
    pub first_offset: Option<i64>,
    pub last_offset: Option<i64>,
    pub records: u64,
    pub committed: Option<i64>,
    pub end_offset: Option<i64>,
    /// Offsets the manifests say held no record (compaction, transaction markers).
    pub offsets_without_record: u64,
    /// Records of suppressed users the manifests say were left out (`suppress`).
    pub records_suppressed: u64,
    /// Lines the manifests say `forget` took out of archived objects.
    pub records_forgotten: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub bucket: String,
    pub topic: String,
    pub objects: usize,
    pub manifests: usize,
    pub records: u64,
    /// Lines decompressed and checked (deep only).
    pub lines_checked: u64,
    pub partitions: Vec<PartitionSummary>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot list s3://{bucket}/{prefix}: {message}")]
    List {
        bucket: String,
        prefix: String,
        message: String,
    },
    #[error("cannot read s3://{bucket}/{key}: {message}")]
    Get {
        bucket: String,
        key: String,
        message: String,
    },
    #[error(transparent)]
    Kafka(#[from] LagError),
}

/// What one manifest says about itself: its files' counts add up to its own, and (version 2 on)
/// its records and gaps account for every offset of `[start, end]`; offsets it holds only as a
/// deleted gap were lost before they could be archived.
pub fn manifest_findings(manifest: &Manifest) -> Vec<(&'static str, String)> {
    let mut findings = Vec::new();
    let range = format!("[{}, {}]", manifest.start, manifest.end);
    let listed: u64 = manifest.files.iter().map(|f| f.records).sum();
    if listed != manifest.records {
        findings.push((
            "count-mismatch",
            format!(
                "batch {range} says {} records, its files {listed}",
                manifest.records
            ),
        ));
    }
    match manifest.unaccounted_offsets() {
        Some(0) | None => {}
        Some(unaccounted) => findings.push((
            "unaccounted-offsets",
            format!(
                "batch {range} holds {} records and {} offsets known to hold none: {unaccounted} \
                 offsets are in neither (records lost)",
                manifest.records,
                manifest.gaps.iter().map(Gap::offsets).sum::<u64>(),
            ),
        )),
    }
    for gap in manifest.deleted() {
        findings.push((
            "deleted-before-archived",
            format!(
                "offsets {}..{} were deleted from kafka (retention or DeleteRecords) before \
                 they were archived",
                gap.first, gap.last
            ),
        ));
    }
    findings
}

/// Runs every check; `Ok` carries the findings, `Err` means the check itself could not run.
pub async fn verify(config: &Config, deep: bool) -> Result<Report, VerifyError> {
    let store = S3Store::connect(&config.s3).await;
    let topic = config.kafka.topic.clone();
    let root = format!("{}{}/", config.s3.prefix, layout::ROOT);
    let manifest_root = format!("{root}_manifests/{topic}/");
    let objects = list(&store, &root).await?;
    let mut report = Report {
        bucket: store.bucket().to_string(),
        topic: topic.clone(),
        ..Report::default()
    };
    let mut findings = Vec::new();

    // Manifests, per partition, in offset order.
    let mut manifests: BTreeMap<i32, Vec<Manifest>> = BTreeMap::new();
    let manifest_keys = objects
        .iter()
        .filter(|(k, _)| k.starts_with(&manifest_root));
    let mut fetched = fetch_in_order(&store, manifest_keys);
    while let Some((key, bytes, _held)) = fetched.next().await {
        let bytes = bytes?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(manifest) if manifest.topic == topic => manifests
                .entry(manifest.partition)
                .or_default()
                .push(manifest),
            Ok(_) => {}
            Err(err) => findings.push(Finding {
                kind: "bad-manifest",
                partition: None,
                detail: format!("{key}: {err}"),
            }),
        }
    }
    // rdkafka calls block: keep them off the async threads.
    let kafka_config = config.clone();
    let kafka = tokio::task::spawn_blocking(move || group_lag(&kafka_config))
        .await
        .expect("kafka lookup thread")?;
    let kafka: HashMap<i32, PartitionLag> = kafka.into_iter().map(|l| (l.partition, l)).collect();

    let referenced = analyze(
        &topic,
        &root,
        &objects,
        manifests,
        &kafka,
        &mut report,
        &mut findings,
    );

    if deep {
        deep_check(
            &store,
            config,
            &referenced,
            &objects,
            &mut report,
            &mut findings,
        )
        .await?;
    }
    report.findings = findings;
    Ok(report)
}

/// Judges what the bucket holds (`objects`, `manifests` per partition) against what the group
/// committed (`kafka`): the summary per partition into `report`, every problem into `findings`.
/// Returns each object a manifest lists, with the line count and CRC32 it records. Pure: the
/// downloads happen before, the deep check after.
pub fn analyze(
    topic: &str,
    root: &str,
    objects: &BTreeMap<String, i64>,
    mut manifests: BTreeMap<i32, Vec<Manifest>>,
    kafka: &HashMap<i32, PartitionLag>,
    report: &mut Report,
    findings: &mut Vec<Finding>,
) -> HashMap<String, (u64, String)> {
    report.manifests = manifests.values().map(Vec::len).sum();
    // Every object a manifest lists, with the line count and CRC32 it records.
    let mut referenced: HashMap<String, (u64, String)> = HashMap::new();
    let mut partitions: Vec<i32> = manifests.keys().chain(kafka.keys()).copied().collect();
    partitions.sort_unstable();
    partitions.dedup();
    for partition in partitions {
        let mut batches = manifests.remove(&partition).unwrap_or_default();
        batches.sort_by_key(|m| (m.start, m.end));
        let lag = kafka.get(&partition);
        let mut summary = PartitionSummary {
            partition,
            batches: batches.len(),
            first_offset: batches.first().map(|m| m.start),
            last_offset: batches.last().map(|m| m.end),
            committed: lag.and_then(|l| l.committed),
            end_offset: lag.map(|l| l.end_offset),
            ..PartitionSummary::default()
        };
        let finding = |kind, detail: String| Finding {
            kind,
            partition: Some(partition),
            detail,
        };
        if let (Some(lag), Some(first)) = (lag, batches.first()) {
            if first.start > lag.low_watermark {
                findings.push(finding(
                    "gap",
                    format!(
                        "offsets {}..{} are in Kafka but in no manifest",
                        lag.low_watermark,
                        first.start - 1
                    ),
                ));
            }
        }
        for pair in batches.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.start > a.end + 1 {
                findings.push(finding(
                    "gap",
                    format!("offsets {}..{} are in no manifest", a.end + 1, b.start - 1),
                ));
            } else if b.start <= a.end {
                findings.push(finding(
                    "overlap",
                    format!(
                        "batches [{}, {}] and [{}, {}] overlap",
                        a.start, a.end, b.start, b.end
                    ),
                ));
            }
        }
        match (summary.committed, summary.last_offset) {
            (Some(committed), Some(last)) if committed > last + 1 => findings.push(finding(
                "gap",
                format!("the group committed {committed} but manifests end at {last}"),
            )),
            (Some(committed), Some(last)) if committed < last + 1 => findings.push(finding(
                "uncommitted-batch",
                format!(
                    "manifests reach {last} but the group committed only {committed} (an upload still in progress?)"
                ),
            )),
            (None, Some(last)) => findings.push(finding(
                "uncommitted-batch",
                format!("manifests reach {last} but the group committed nothing"),
            )),
            _ => {}
        }
        for manifest in &batches {
            for (kind, detail) in manifest_findings(manifest) {
                findings.push(finding(kind, detail));
            }
            let offsets = |cause| {
                let gaps = manifest.gaps.iter().filter(|g| g.cause == cause);
                gaps.map(Gap::offsets).sum::<u64>()
            };
            summary.offsets_without_record += offsets(GapCause::NoRecord);
            summary.records_suppressed += offsets(GapCause::Suppressed);
            summary.records_forgotten += manifest.files.iter().map(|f| f.forgotten).sum::<u64>();
            summary.records += manifest.records;
            // An object a zombie put after the batch's replay: the batch's, its lines in the
            // batch's `deleted` gap. Checked like the others when it is there.
            for file in &manifest.may_appear {
                if objects.contains_key(&file.key) {
                    referenced.insert(file.key.clone(), (file.records, file.crc32.clone()));
                }
            }
            for file in &manifest.files {
                referenced.insert(file.key.clone(), (file.records, file.crc32.clone()));
                if !objects.contains_key(&file.key) {
                    findings.push(finding(
                        "missing-object",
                        format!(
                            "{} of batch [{}, {}] is not in the bucket",
                            file.key, manifest.start, manifest.end
                        ),
                    ));
                }
            }
        }
        report.records += summary.records;
        report.partitions.push(summary);
    }

    // Objects of this topic that no manifest lists.
    let dead_letter_root = format!("{root}_dead-letter/{topic}/");
    for key in objects.keys() {
        let named = key
            .rsplit_once('/')
            .is_some_and(|(_, name)| layout::parse_object_name(topic, name).is_some());
        let ours =
            named && (!key[root.len()..].starts_with('_') || key.starts_with(&dead_letter_root));
        if ours {
            report.objects += 1;
            if !referenced.contains_key(key) {
                findings.push(Finding {
                    kind: "extra-object",
                    partition: None,
                    detail: format!("{key} is in no manifest"),
                });
            }
        }
    }
    referenced
}

/// Downloads every referenced object: it must be one gzip member whose lines match the
/// manifest, and no `messageId` may appear twice anywhere.
async fn deep_check(
    store: &S3Store,
    config: &Config,
    referenced: &HashMap<String, (u64, String)>,
    objects: &BTreeMap<String, i64>,
    report: &mut Report,
    findings: &mut Vec<Finding>,
) -> Result<(), VerifyError> {
    let root = format!("{}{}/", config.s3.prefix, layout::ROOT);
    let journaled = forget_journals(store, &config.s3.prefix, objects, findings).await?;
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut keys: Vec<(&String, &i64)> = referenced
        .keys()
        .filter_map(|k| objects.get_key_value(k))
        .collect();
    keys.sort();
    let mut fetched = fetch_in_order(store, keys);
    // `_held`: the object's share of the download budget, given back once it is checked.
    while let Some((key, bytes, _held)) = fetched.next().await {
        let bytes = bytes?;
        let expected = referenced.get(key.as_str()).cloned();
        let dead_letter = key.starts_with(&format!("{root}_"));
        let owned_key = key.clone();
        // Decompressing and parsing a large object is seconds of CPU: not on the async threads.
        let checked = tokio::task::spawn_blocking(move || {
            inspect_object(&owned_key, &bytes, expected, dead_letter)
        })
        .await
        .expect("object check thread");
        let checked = explain_by_journal(checked, key, referenced.get(key.as_str()), &journaled);
        record_object(&mut seen, key, checked, report, findings);
    }
    Ok(())
}

async fn forget_journals(
    store: &S3Store,
    prefix: &str,
    objects: &BTreeMap<String, i64>,
    findings: &mut Vec<Finding>,
) -> Result<Journaled, VerifyError> {
    let root = forget_prefix(prefix);
    let keys = objects
        .range(root.clone()..)
        .take_while(|(key, _)| key.starts_with(&root))
        .filter(|(key, _)| key.ends_with("/journal.json"));
    let mut journaled = Journaled::new();
    let mut fetched = fetch_in_order(store, keys);
    while let Some((key, bytes, _held)) = fetched.next().await {
        match serde_json::from_slice::<Journal>(&bytes?) {
            Ok(journal) => {
                for rewrite in journal.rewrites {
                    let entry = journaled.entry(rewrite.key.clone()).or_default();
                    entry.push((journal.request.clone(), rewrite));
                }
            }
            Err(err) => findings.push(Finding {
                kind: "bad-manifest",
                partition: None,
                detail: format!("{key}: {err}"),
            }),
        }
    }
    Ok(journaled)
}

/// An object a `forget` journal explains: said as an unfinished request, not as damage.
pub fn explain_by_journal(
    mut checked: ObjectCheck,
    key: &str,
    expected: Option<&(u64, String)>,
    journaled: &Journaled,
) -> ObjectCheck {
    let (Some(expected), Some(crc32)) = (expected, checked.crc32.as_deref()) else {
        return checked;
    };
    if let Some(detail) = unfinished(journaled, key, expected, (checked.lines, crc32)) {
        checked.findings.retain(|f| f.kind != "count-mismatch");
        checked.findings.push(Finding {
            kind: "forget-unfinished",
            partition: None,
            detail,
        });
    }
    checked
}

/// Adds what one object of the deep check holds to the report: its findings, and a
/// `duplicate-message-id` for each `messageId` an earlier object (in `seen`) holds too.
pub fn record_object(
    seen: &mut HashMap<String, String>,
    key: &str,
    checked: ObjectCheck,
    report: &mut Report,
    findings: &mut Vec<Finding>,
) {
    report.lines_checked += checked.lines;
    findings.extend(checked.findings);
    for id in checked.message_ids {
        if let Some(first) = seen.insert(id.clone(), key.to_string()) {
            findings.push(Finding {
                kind: "duplicate-message-id",
                partition: None,
                // Escaped: an id is whatever a producer wrote, control characters included.
                detail: format!("messageId {id:?} is in {first} and {key}"),
            });
        }
    }
}

/// What one downloaded object holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectCheck {
    pub lines: u64,
    pub findings: Vec<Finding>,
    /// `messageId`s of its events (dead letters carry none of their own).
    pub message_ids: Vec<String>,
    /// CRC32 of its uncompressed content, hex (`None` when it could not be read to its end).
    pub crc32: Option<String>,
}

/// Checks an object's bytes: exactly one gzip member, with the line count and CRC32 its manifest
/// records (`expected`); collects its events' `messageId`s. The content is read a line at a
/// time, never inflated whole: an object can hold hundreds of megabytes.
pub fn inspect_object(
    key: &str,
    bytes: &[u8],
    expected: Option<(u64, String)>,
    dead_letter: bool,
) -> ObjectCheck {
    let mut check = ObjectCheck::default();
    let corrupt = |check: &mut ObjectCheck, err: String| {
        check.findings.push(Finding {
            kind: "corrupt-object",
            partition: None,
            detail: format!("{key}: {err}"),
        });
    };
    let mut decoded = match crate::object::decode_object(key, bytes) {
        Ok(decoded) => decoded,
        Err(err) => {
            corrupt(&mut check, err);
            return check;
        }
    };
    let mut crc = crc32fast::Hasher::new();
    let mut line = Vec::new();
    loop {
        match decoded.next_line(&mut line) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                check.message_ids.clear();
                corrupt(&mut check, err);
                return check;
            }
        }
        crc.update(&line);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        check.lines += 1;
        if dead_letter {
            continue;
        }
        if let Ok(event) = serde_json::from_slice::<serde_json::Value>(text) {
            if let Some(id) = event.get("messageId").and_then(|v| v.as_str()) {
                check.message_ids.push(id.to_string());
            }
        }
    }
    if decoded.trailing() {
        corrupt(
            &mut check,
            "bytes follow the first gzip member or zstd frame".into(),
        );
    }
    let actual_crc = format!("{:08x}", crc.finalize());
    check.crc32 = Some(actual_crc.clone());
    if let Some((records, expected_crc)) = expected {
        if records != check.lines || expected_crc != actual_crc {
            check.findings.push(Finding {
                kind: "count-mismatch",
                partition: None,
                detail: format!(
                    "{key}: manifest says {records} lines (crc32 {expected_crc}), object has {} (crc32 {actual_crc})",
                    check.lines
                ),
            });
        }
    }
    check
}

/// Objects (key, size) fetched a few at a time (one by one, a bucket of thousands of small
/// objects took minutes), handed back in the order of `keys` so findings come out the same on
/// every run, each with its share of the download budget ([`FETCH_KIB`]): a download waits until
/// the objects before it were checked and their shares dropped.
fn fetch_in_order<'a>(
    store: &'a S3Store,
    keys: impl IntoIterator<Item = (&'a String, &'a i64)> + 'a,
) -> impl Stream<
    Item = (
        &'a String,
        Result<Vec<u8>, VerifyError>,
        tokio::sync::OwnedSemaphorePermit,
    ),
> + 'a {
    let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(FETCH_KIB as usize));
    futures_util::stream::iter(keys)
        .map(move |(key, &size)| {
            let budget = std::sync::Arc::clone(&budget);
            async move {
                let kib =
                    u32::try_from(size.max(0) / 1024 + 1).map_or(FETCH_KIB, |k| k.min(FETCH_KIB));
                let held = budget
                    .acquire_many_owned(kib)
                    .await
                    .expect("the budget is never closed");
                (key, get(store, key).await, held)
            }
        })
        .buffered(FETCH_CONCURRENCY)
}

async fn list(store: &S3Store, prefix: &str) -> Result<BTreeMap<String, i64>, VerifyError> {
    let objects = store.list(prefix).await.map_err(|err| VerifyError::List {
        bucket: store.bucket().to_string(),
        prefix: prefix.to_string(),
        message: err.message,
    })?;
    Ok(objects.into_iter().collect())
}

async fn get(store: &S3Store, key: &str) -> Result<Vec<u8>, VerifyError> {
    let fail = |message: String| VerifyError::Get {
        bucket: store.bucket().to_string(),
        key: key.to_string(),
        message,
    };
    match store.get_bytes(key).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(fail("no such key".into())),
        Err(err) => Err(fail(err.message)),
    }
}

impl Report {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "s3://{} topic {}: {} objects, {} manifests, {} records{}\n",
            self.bucket,
            self.topic,
            self.objects,
            self.manifests,
            self.records,
            if self.lines_checked > 0 {
                format!(", {} lines decompressed and checked", self.lines_checked)
            } else {
                String::new()
            }
        );
        out.push_str("partition  batches  offsets               records  committed  end\n");
        for p in &self.partitions {
            let range = match (p.first_offset, p.last_offset) {
                (Some(a), Some(b)) => format!("{a}..{b}"),
                _ => "-".into(),
            };
            let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            out.push_str(&format!(
                "{:>9}  {:>7}  {:<20}  {:>7}  {:>9}  {}\n",
                p.partition,
                p.batches,
                range,
                p.records,
                show(p.committed),
                show(p.end_offset)
            ));
        }
        let suppressed: u64 = self.partitions.iter().map(|p| p.records_suppressed).sum();
        if suppressed > 0 {
            out.push_str(&format!(
                "{suppressed} records of suppressed users left out, as their manifests record\n"
            ));
        }
        let forgotten: u64 = self.partitions.iter().map(|p| p.records_forgotten).sum();
        if forgotten > 0 {
            out.push_str(&format!(
                "{forgotten} lines of deleted users taken out by forget, as their manifests record\n"
            ));
        }
        if self.findings.is_empty() {
            out.push_str("no findings\n");
        } else {
            out.push_str(&format!("{} findings:\n", self.findings.len()));
            for f in &self.findings {
                match f.partition {
                    Some(p) => {
                        out.push_str(&format!("  {} (partition {p}): {}\n", f.kind, f.detail))
                    }
                    None => out.push_str(&format!("  {}: {}\n", f.kind, f.detail)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::manifest::ManifestFile;

    fn manifest(start: i64, end: i64, records: u64, gaps: Vec<Gap>) -> Manifest {
        Manifest {
            version: crate::upload::manifest::VERSION,
            topic: "t".into(),
            partition: 0,
            start,
            end,
            records,
            files: vec![ManifestFile {
                key: "k".into(),
                first_offset: start,
                records,
                uncompressed_bytes: 1,
                compressed_bytes: 1,
                crc32: "0".into(),
                deleted_from_kafka: 0,
                forgotten: 0,
            }],
            gaps,
            may_appear: Vec::new(),
        }
    }

    fn kinds(manifest: &Manifest) -> Vec<&'static str> {
        manifest_findings(manifest)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn a_batch_whose_records_and_gaps_cover_it_is_clean() {
        let gaps = vec![Gap {
            first: 150,
            last: 159,
            cause: GapCause::NoRecord,
        }];
        assert!(kinds(&manifest(100, 199, 90, gaps)).is_empty());
    }

    /// A replay sealed early (the disk-pressure bug): the manifest claims `[0, 799]` but holds
    /// 400 records and no gap.
    #[test]
    fn a_batch_short_of_records_is_a_loss() {
        let findings = manifest_findings(&manifest(0, 799, 400, vec![]));
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].0, "unaccounted-offsets");
        assert!(
            findings[0].1.contains("400 offsets are in neither"),
            "{findings:?}"
        );
    }

    #[test]
    fn offsets_deleted_before_archiving_are_reported() {
        let gaps = vec![Gap {
            first: 0,
            last: 49,
            cause: GapCause::Deleted,
        }];
        let findings = manifest_findings(&manifest(0, 99, 50, gaps));
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].0, "deleted-before-archived");
        assert!(findings[0].1.contains("offsets 0..49"), "{findings:?}");
    }

    #[test]
    fn version_one_manifests_recorded_no_gaps() {
        let old = Manifest {
            version: 1,
            ..manifest(0, 99, 90, vec![])
        };
        assert!(kinds(&old).is_empty());
    }

    fn object_of(start: i64, end: i64) -> Manifest {
        let mut manifest = manifest(start, end, (end - start + 1) as u64, Vec::new());
        manifest.files[0].key = format!("segment-logs/web/1/t-0-{start:020}.gz");
        manifest
    }

    fn lag(low: i64, end: i64, committed: Option<i64>) -> HashMap<i32, PartitionLag> {
        [(
            0,
            PartitionLag {
                partition: 0,
                low_watermark: low,
                high_watermark: end,
                end_offset: end,
                committed,
            },
        )]
        .into()
    }

    /// Runs the analysis; the finding kinds it reports.
    fn analyzed(
        manifests: Vec<Manifest>,
        objects: &[&str],
        kafka: &HashMap<i32, PartitionLag>,
    ) -> (Report, Vec<&'static str>) {
        let objects: BTreeMap<String, i64> = objects.iter().map(|k| (k.to_string(), 1)).collect();
        let mut report = Report::default();
        let mut findings = Vec::new();
        let manifests = BTreeMap::from([(0, manifests)]);
        analyze(
            "t",
            "segment-logs/",
            &objects,
            manifests,
            kafka,
            &mut report,
            &mut findings,
        );
        (report, findings.iter().map(|f| f.kind).collect())
    }

    #[test]
    fn contiguous_committed_batches_whose_objects_are_all_there_are_clean() {
        let batches = vec![object_of(100, 199), object_of(0, 99)];
        let keys = [
            "segment-logs/web/1/t-0-00000000000000000000.gz",
            "segment-logs/web/1/t-0-00000000000000000100.gz",
        ];
        let (report, kinds) = analyzed(batches, &keys, &lag(0, 200, Some(200)));
        assert_eq!(kinds, Vec::<&str>::new());
        assert_eq!(report.records, 200);
        assert_eq!(report.objects, 2);
        assert_eq!(report.partitions[0].first_offset, Some(0));
        assert_eq!(report.partitions[0].last_offset, Some(199));
    }

    #[test]
    fn gaps_overlaps_missing_and_extra_objects_and_uncommitted_batches_are_found() {
        let keys = [
            "segment-logs/web/1/t-0-00000000000000000010.gz",
            "segment-logs/web/1/t-0-00000000000000000150.gz",
            "segment-logs/web/1/t-0-00000000000000099999.gz",
        ];
        let batches = vec![object_of(10, 99), object_of(150, 199), object_of(190, 249)];
        let (_, kinds) = analyzed(batches, &keys, &lag(0, 300, Some(200)));
        assert_eq!(
            kinds,
            [
                "gap",               // 0..9: in Kafka, in no manifest
                "gap",               // 100..149
                "overlap",           // [150, 199] and [190, 249]
                "uncommitted-batch", // manifests reach 249, the group committed 200
                "missing-object",    // batch [190, 249]'s object
                "extra-object",      // 99999 is in no manifest
            ]
        );
        // The group committed past the last manifest: offsets were committed unarchived.
        let (_, kinds) = analyzed(
            vec![object_of(0, 99)],
            &["segment-logs/web/1/t-0-00000000000000000000.gz"],
            &lag(0, 300, Some(300)),
        );
        assert_eq!(kinds, ["gap"]);
    }

    /// Two topics archived under one prefix, one named like the other and more (`t` and
    /// `t-eu`): the other's objects and dead letters are not this topic's extra objects.
    #[test]
    fn objects_of_a_topic_whose_name_extends_this_ones_are_not_extra() {
        let keys = [
            "segment-logs/web/1/t-0-00000000000000000000.gz",
            "segment-logs/web/1/t-eu-0-00000000000000000000.gz",
            "segment-logs/web/1/t-1-0-00000000000000000000.zst",
            "segment-logs/_dead-letter/t-eu/1/t-eu-0-00000000000000000005.gz",
        ];
        let (report, kinds) = analyzed(vec![object_of(0, 99)], &keys, &lag(0, 100, Some(100)));
        assert_eq!(kinds, Vec::<&str>::new());
        assert_eq!(report.objects, 1);
    }

    /// A replay found a planned file's every record deleted and its object absent; the first
    /// attempt, frozen past its session timeout, put it after the replay's manifest. The
    /// manifest names it as one that may appear: the batch's, not an extra object; and not
    /// missing while it is absent.
    #[test]
    fn an_object_the_manifest_says_may_appear_is_the_batchs_present_or_not() {
        let late = "segment-logs/web/1/t-0-00000000000000000000.gz";
        let mut batch = object_of(0, 99);
        batch.files.clear();
        batch.records = 0;
        batch.gaps = vec![Gap {
            first: 0,
            last: 99,
            cause: GapCause::Deleted,
        }];
        batch.may_appear = vec![ManifestFile {
            key: late.into(),
            first_offset: 0,
            records: 100,
            uncompressed_bytes: 1,
            compressed_bytes: 1,
            crc32: "0".into(),
            deleted_from_kafka: 100,
            forgotten: 0,
        }];
        for objects in [vec![late], vec![]] {
            let (report, kinds) = analyzed(vec![batch.clone()], &objects, &lag(0, 100, Some(100)));
            assert_eq!(kinds, ["deleted-before-archived"], "objects {objects:?}");
            assert_eq!(report.records, 0);
        }
        batch.may_appear.clear();
        let (_, kinds) = analyzed(vec![batch], &[late], &lag(0, 100, Some(100)));
        assert_eq!(kinds, ["deleted-before-archived", "extra-object"]);
    }

    fn gzip(text: &str) -> Vec<u8> {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn an_object_is_checked_against_its_manifest_line() {
        let text = "{\"messageId\":\"a\"}\n{\"messageId\":\"b\"}\n";
        let crc = format!("{:08x}", crc32fast::hash(text.as_bytes()));
        let good = inspect_object("k", &gzip(text), Some((2, crc.clone())), false);
        assert_eq!(good.lines, 2);
        assert_eq!(good.findings, []);
        assert_eq!(good.message_ids, ["a", "b"]);

        let short = inspect_object("k", &gzip(text), Some((3, crc.clone())), false);
        assert_eq!(short.findings[0].kind, "count-mismatch");

        let mut two_members = gzip(text);
        two_members.extend(gzip(text));
        let trailing = inspect_object("k", &two_members, None, false);
        assert_eq!(trailing.findings[0].kind, "corrupt-object");

        let corrupt = inspect_object("k", b"not gzip", Some((2, crc)), false);
        assert_eq!(corrupt.findings[0].kind, "corrupt-object");
        assert_eq!(corrupt.lines, 0);

        let dead = inspect_object("k", &gzip(text), None, true);
        assert!(dead.message_ids.is_empty());

        // Cut short: what was read is no finding of its own, the break is.
        let whole = gzip(&text.repeat(1000));
        let cut = inspect_object("k", &whole[..whole.len() / 2], None, false);
        assert_eq!(cut.findings.len(), 1, "{:?}", cut.findings);
        assert_eq!(cut.findings[0].kind, "corrupt-object");
        assert!(cut.message_ids.is_empty());
    }

    /// An object `forget` rewrote before it could update the manifest is said to be that, and
    /// only when it holds exactly what the journal says; anything else stays a mismatch.
    #[test]
    fn an_object_a_forget_journal_explains_is_an_unfinished_forget() {
        use crate::forget::journal::Rewrite;
        use crate::forget::rewrite::Content;
        let (old, new) = (
            "{\"userId\":\"u1\"}\n{\"userId\":\"u2\"}\n",
            "{\"userId\":\"u2\"}\n",
        );
        let content = |text: &str| Content {
            records: text.lines().count() as u64,
            uncompressed_bytes: text.len() as u64,
            crc32: format!("{:08x}", crc32fast::hash(text.as_bytes())),
        };
        let rewrite = Rewrite {
            key: "k".into(),
            manifest: None,
            old: content(old),
            new: content(new),
            old_compressed_bytes: 0,
        };
        let journaled = Journaled::from([("k".to_string(), vec![("r1".to_string(), rewrite)])]);
        let expected = (2, content(old).crc32);
        let check = |text: &str| {
            let checked = inspect_object("k", &gzip(text), Some(expected.clone()), false);
            let checked = explain_by_journal(checked, "k", Some(&expected), &journaled);
            checked.findings.iter().map(|f| f.kind).collect::<Vec<_>>()
        };
        assert_eq!(check(new), ["forget-unfinished"]);
        assert!(check(old).is_empty());
        assert_eq!(check("{}\n"), ["count-mismatch"]);
    }

    /// A `messageId` is whatever a producer wrote: printed escaped, it cannot forge report lines
    /// or terminal escapes.
    #[test]
    fn duplicate_ids_are_printed_escaped() {
        let text = "{\"messageId\":\"x\\nFAKE \\u001b[2J\"}\n";
        let (mut seen, mut report, mut findings) = (HashMap::new(), Report::default(), Vec::new());
        for key in ["a", "b"] {
            let checked = inspect_object(key, &gzip(text), None, false);
            record_object(&mut seen, key, checked, &mut report, &mut findings);
        }
        assert_eq!(findings.len(), 1);
        let detail = &findings[0].detail;
        assert!(
            !detail.contains('\n') && !detail.contains('\u{1b}'),
            "{detail}"
        );
        assert!(detail.contains(r"x\nFAKE \u{1b}[2J"), "{detail}");
    }
}
