//! The exactly-once protocol against a broker that keeps commit metadata (librdkafka's mock
//! cluster in its own process): intents recorded before uploads, replayed by the next owner.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use support::s3_proxy::{FaultProxy, FaultRates};
use support::*;

/// An archiver records its batch intents but cannot put a single object, and dies; another
/// one, on another volume, finds the intents and replays exactly those batches before going on.
#[test]
fn an_interrupted_batch_is_replayed_exactly_by_the_next_owner() {
    interrupted_batches_are_replayed_exactly("gzip", ".gz");
}

/// The same with zstd objects: one frame each, replayed exactly, checked by `verify --deep`.
#[test]
fn an_interrupted_batch_of_zstd_objects_is_replayed_exactly_by_the_next_owner() {
    interrupted_batches_are_replayed_exactly("zstd", ".zst");
}

fn interrupted_batches_are_replayed_exactly(compression: &str, extension: &'static str) {
    let rig = Rig::start_mock(2);
    rig.produce(4_000, 4, 2, 11);
    // The bucket refuses every event object; the cutting rules (and the start-up probe) go in,
    // so the member gets as far as recording its intents.
    let proxy = refusing(&rig, extension, 5);
    let refusing_s3 = proxy.endpoint();
    let mut first = rig.archiver(
        "first",
        &rig.dir.path().join("first-volume"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_S3_ENDPOINT_URL", &refusing_s3),
            ("ARCHIVER_OUTPUT_COMPRESSION", compression),
        ],
    );
    // Wait until both partitions carry an intent in the group's commit.
    let deadline = Instant::now() + Duration::from_secs(60);
    let intents: BTreeMap<i32, serde_json::Value> = loop {
        let committed = rig.committed_with_metadata(2);
        let intents: BTreeMap<i32, serde_json::Value> = committed
            .iter()
            .filter_map(|(&p, (_, metadata))| Some((p, serde_json::from_str(metadata).ok()?)))
            .collect();
        if intents.len() == 2 {
            break intents;
        }
        assert!(
            Instant::now() < deadline,
            "no intents recorded: {committed:?}\n{}",
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        first.log_text().contains("keeps offset-commit metadata"),
        "{}",
        first.log_text()
    );
    // More records arrive behind the interrupted batches; they must not join them.
    rig.produce(2_000, 4, 2, 12);
    std::thread::sleep(Duration::from_secs(1));
    first.kill9();

    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    // The new owner also meets a slow coordinator that refuses its first commits.
    rig.broker
        .control("errors OffsetCommit REBALANCE_IN_PROGRESS 3");
    rig.broker.control("rtt 1 50");
    let mut second = rig.archiver(
        "second",
        &rig.dir.path().join("second-volume"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_OUTPUT_COMPRESSION", compression),
        ],
    );
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut second]);
    assert!(
        second.terminate(Duration::from_secs(40)).success(),
        "{}",
        second.log_text()
    );

    let log = second.log_text();
    assert!(log.contains("offset commit failed, will retry"), "{log}");
    let replays = log_events(&log, "replaying the batch an interrupted upload recorded");
    let manifests = rig.s3.manifests(rig.dir.path());
    for (partition, intent) in &intents {
        let (start, end) = (
            intent["start"].as_i64().unwrap(),
            intent["end"].as_i64().unwrap(),
        );
        assert!(
            replays
                .iter()
                .any(|e| e["partition"] == partition.to_string() && e["end"] == end.to_string()),
            "partition {partition} did not replay [{start}, {end}]:\n{log}"
        );
        // The replayed batch is exactly the recorded one, and the batches after it follow on.
        let mut batches: Vec<(i64, i64)> = manifests
            .iter()
            .filter(|m| m["partition"] == *partition)
            .map(|m| (m["start"].as_i64().unwrap(), m["end"].as_i64().unwrap()))
            .collect();
        batches.sort();
        assert_eq!(
            batches[0],
            (start, end),
            "partition {partition}: {batches:?}"
        );
        for pair in batches.windows(2) {
            assert_eq!(
                pair[0].1 + 1,
                pair[1].0,
                "partition {partition}: gap or overlap in {batches:?}"
            );
        }
        assert_eq!(batches.last().unwrap().1 + 1, ends[partition]);
    }

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    assert!(objects.iter().all(|o| o.key.ends_with(extension)));
    assert_exactly_once(&objects, &records, None);

    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep found problems: {report:#}");
    assert_eq!(report["lines_checked"], 6_000);
    assert_eq!(report["records"], 6_000);

    // verify notices what it should: an object gone, an object no manifest lists.
    let victim = rig
        .s3
        .keys()
        .into_iter()
        .find(|k| k.ends_with(extension) && !k.contains("/_"))
        .unwrap();
    rig.s3
        .aws(&["s3", "rm", &format!("s3://{BUCKET}/{victim}")]);
    let stray = out.join(format!("stray{extension}"));
    std::fs::copy(out.join(&victim), &stray).unwrap();
    let stray_key = format!(
        "segment-logs/src/2026-01-01/{}-0-00000000000000999999{extension}",
        rig.topic
    );
    rig.s3.aws(&[
        "s3",
        "cp",
        stray.to_str().unwrap(),
        &format!("s3://{BUCKET}/{stray_key}"),
    ]);
    let (clean, report) = rig.verify(false);
    assert!(!clean);
    let kinds: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"missing-object"), "{report:#}");
    assert!(kinds.contains(&"extra-object"), "{report:#}");
}

/// Two pods with the same `group.instance.id` (a copied StatefulSet, a stuck old pod): the broker
/// fences one of them with FENCED_INSTANCE_ID, which librdkafka makes a fatal error. The fenced
/// member must not hang on as a consumer that consumes nothing: it turns unready, names the
/// cause and exits non-zero, so Kubernetes restarts it.
#[test]
fn a_fenced_static_member_exits_with_the_cause() {
    let rig = Rig::start_mock(2);
    rig.produce(1_000, 2, 1, 21);
    let mut member = rig.archiver(
        "fenced",
        &rig.dir.path().join("volume"),
        &[
            ("ARCHIVER_KAFKA_GROUP_INSTANCE_ID", "archiver-0"),
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    let ends = end_offsets(&rig.read_topic(2));
    rig.wait_committed(&ends, Duration::from_secs(60), &mut [&mut member]);
    // What the coordinator answers a member whose instance id another member took over.
    rig.broker
        .control("errors Heartbeat FENCED_INSTANCE_ID 1000");
    let status = member.wait_exit(Duration::from_secs(60));
    let log = member.log_text();
    assert!(
        !status.success(),
        "a fenced member must exit non-zero:\n{log}"
    );
    assert!(
        log.contains("fatal kafka error") && log.contains("same group.instance.id"),
        "the error must name the cause:\n{log}"
    );
    rig.broker.control("clear Heartbeat");
}

/// A replay puts the keys the interrupted upload already put. Objects that hold the same lines
/// are left alone: rewriting them (other bytes, as flush points differ) would fire the bucket's
/// `ObjectCreated` notifications again, and Snowpipe- or Lambda-style loaders would ingest them
/// twice.
#[test]
fn a_replay_leaves_objects_already_in_the_bucket_alone() {
    let rig = Rig::start_mock(2);
    rig.produce(2_000, 3, 2, 41);
    let uploaded = interrupt_before_the_manifests(&rig, 3, &[]);
    let schedule = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
    ];
    assert!(!uploaded.is_empty());
    // S3's last-modified times have one-second resolution.
    std::thread::sleep(Duration::from_millis(1_100));

    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let metrics = take_over(&rig, &ends, &schedule);
    let after = rig.s3.versions();
    for (key, version) in &uploaded {
        assert_eq!(after.get(key), Some(version), "{key} was rewritten");
    }
    assert_eq!(
        metrics.get("archiver_objects_already_present_total"),
        Some(&(uploaded.len() as f64)),
        "every object of the interrupted upload found in place"
    );
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep found problems: {report:#}");
}

/// A rolling change of cutting rules: the member that recorded an intent cut small files into
/// `epoch-ms` day folders, the member that replays it runs with large files and `date` folders.
/// The replay cuts with the rules its intent names (stored in the bucket under their hash), so it
/// writes exactly the interrupted upload's objects again, and only the batches after it follow
/// the new rules.
#[test]
fn a_replay_cuts_with_the_rules_its_intent_was_recorded_under() {
    let rig = Rig::start_mock(2);
    rig.produce(2_000, 3, 2, 51);
    let uploaded =
        interrupt_before_the_manifests(&rig, 4, &[("ARCHIVER_BUFFER_MAX_FILE_BYTES", "20000")]);
    assert!(uploaded.len() > 6, "small files: {uploaded:?}");

    rig.produce(1_000, 3, 2, 52);
    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let metrics = take_over(
        &rig,
        &ends,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_BUFFER_MAX_FILE_BYTES", "1000000"),
            ("ARCHIVER_ROUTING_DAY_FORMAT", "date"),
        ],
    );
    // Every object of the interrupted upload was cut again exactly: found in place.
    assert_eq!(
        metrics.get("archiver_objects_already_present_total"),
        Some(&(uploaded.len() as f64))
    );
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    assert_exactly_once(&objects, &records, None);
    // The batches after the replay follow the new rules.
    assert!(
        objects
            .iter()
            .any(|o| o.day.len() == 10 && o.day.contains('-')),
        "no object in a date folder"
    );
    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep found problems: {report:#}");
}

/// Waits until `archiver` has put a batch's objects on both partitions and had its manifest
/// refused: each batch stopped between its objects and its manifest, its intent recorded.
fn wait_manifests_refused(rig: &Rig, archiver: &Process) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = archiver.log_text();
        let refused = |partition: i32| {
            log.lines().any(|line| {
                line.contains("s3 refused the request")
                    && line.contains(&format!("_manifests/{}/{partition}/", rig.topic))
            })
        };
        if refused(0) && refused(1) {
            return;
        }
        assert!(Instant::now() < deadline, "no manifest refused yet:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a member (2-second schedule, `extra` on top) whose bucket refuses manifests, so that
/// each partition's batch stops between its objects and its manifest with its intent recorded;
/// kills it there and returns the objects it put (key → ETag, Last-Modified).
fn interrupt_before_the_manifests(
    rig: &Rig,
    seed: u64,
    extra: &[(&str, &str)],
) -> BTreeMap<String, (String, String)> {
    // Puts only: before each object the member looks for the batch's manifest.
    let proxy = FaultProxy::start(
        rig.s3.port,
        FaultRates {
            refuse_with: Some("AccessDenied"),
            refuse_only: Some("/_manifests/segment-events/"),
            refuse_method: Some("PUT"),
            ..FaultRates::default()
        },
        seed,
    );
    let proxied = proxy.endpoint();
    let mut settings = vec![
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_S3_ENDPOINT_URL", proxied.as_str()),
    ];
    settings.extend_from_slice(extra);
    let mut first = rig.archiver("first", &rig.dir.path().join("first-volume"), &settings);
    wait_manifests_refused(rig, &first);
    first.kill9();
    event_object_versions(rig)
}

/// Key → (ETag, Last-Modified) of every event object in the bucket.
fn event_object_versions(rig: &Rig) -> BTreeMap<String, (String, String)> {
    rig.s3
        .versions()
        .into_iter()
        .filter(|(key, _)| key.ends_with(".gz") && !key.contains("/_"))
        .collect()
}

/// Starts the member that takes the partitions over (on a fresh volume), waits until it
/// committed `ends`, stops it cleanly and returns its metrics.
fn take_over(
    rig: &Rig,
    ends: &BTreeMap<i32, i64>,
    settings: &[(&str, &str)],
) -> BTreeMap<String, f64> {
    let mut second = rig.archiver("second", &rig.dir.path().join("second-volume"), settings);
    rig.wait_committed(ends, Duration::from_secs(120), &mut [&mut second]);
    let metrics = second.scrape();
    assert!(second.terminate(Duration::from_secs(40)).success());
    metrics
}

/// A proxy in front of the rig's S3 server that answers `403 AccessDenied` to every request
/// whose method and path contain `only`, and forwards the rest.
fn refusing(rig: &Rig, only: &'static str, seed: u64) -> FaultProxy {
    FaultProxy::start(
        rig.s3.port,
        FaultRates {
            refuse_with: Some("AccessDenied"),
            refuse_only: Some(only),
            ..FaultRates::default()
        },
        seed,
    )
}

/// A JoinGroup the broker refuses for good (`session_timeout_ms` outside what it allows) is not
/// retried every few seconds forever: the member turns unready, names the cause and exits
/// non-zero.
#[test]
fn a_join_the_broker_refuses_for_good_stops_the_member_with_the_cause() {
    let rig = Rig::start_mock(2);
    rig.broker
        .control("errors JoinGroup INVALID_SESSION_TIMEOUT 1000");
    let mut member = rig.archiver("refused", &rig.dir.path().join("volume"), &[]);
    let status = member.wait_exit(Duration::from_secs(60));
    let log = member.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("cannot get past") && log.contains("kafka.session_timeout_ms"),
        "{log}"
    );
    rig.broker.control("clear JoinGroup");
}

/// A batch whose compressed bytes do not decompress: librdkafka reports it and fetches it again
/// every few seconds, forever. The member stops instead, with the partition, the offset and the
/// cause, and nothing after the batch is committed — whether it read records before the batch
/// in the same run or starts right at it (a restart: librdkafka knows no position yet).
#[test]
fn a_batch_that_does_not_decode_stops_the_member_naming_partition_and_offset() {
    let rig = Rig::start_mock(1);
    rig.produce(200, 2, 1, 23);
    rig.archive_to_the_end("before", 1, &[]);
    let offset = raw_batch::append_batch(
        &rig.broker.bootstrap(),
        &rig.topic,
        0,
        raw_batch::GZIP,
        3,
        b"these bytes are not gzip",
    );
    assert_eq!(
        offset, 200,
        "the damaged batch follows the 200 good records"
    );
    rig.produce(50, 2, 1, 24);

    let runs = [
        // The group's member, restarted: it starts at the committed offset, the damaged batch.
        ("restarted", vec![]),
        // Another group, reading the log from its start into another prefix: 200 records first.
        (
            "from-the-start",
            vec![
                ("ARCHIVER_KAFKA_GROUP_ID", "archiver-from-the-start"),
                ("ARCHIVER_KAFKA_UNCOMMITTED_START", "reset"),
                ("ARCHIVER_S3_PREFIX", "again/"),
            ],
        ),
    ];
    for (name, settings) in runs {
        let mut member = rig.archiver(name, &rig.dir.path().join(name), &settings);
        let status = member.wait_exit(Duration::from_secs(60));
        let log = member.log_text();
        assert!(!status.success(), "{name}: the member must stop:\n{log}");
        assert!(
            log.contains("cannot get past on partition 0 at offset 200")
                && log.contains("Invalid compressed data")
                && log.contains("--reset-offsets"),
            "{name}: the error must name the partition, the offset and the cause:\n{log}"
        );
    }
    let committed = rig.committed(1);
    assert_eq!(
        committed[&0],
        Some(200),
        "nothing past the damaged batch may be committed"
    );
}

/// Produces full-size events in runs of `chunk` until every partition's log start (the mock
/// cluster keeps the newest 5 MB of each partition, as `retention.bytes` would) is past
/// `beyond`; returns the log starts.
fn produce_until_retention_passes(
    rig: &Rig,
    beyond: &BTreeMap<i32, i64>,
    chunk: u64,
    seed: u64,
) -> BTreeMap<i32, i64> {
    for run in 0..200 {
        let starts = rig.log_starts(beyond.len() as u32);
        if beyond.iter().all(|(p, offset)| starts[p] > *offset) {
            return starts;
        }
        rig.produce(chunk, 3, 2, seed + run);
    }
    panic!("retention never passed {beyond:?}");
}

/// Adds `more` (records read later) to `records`.
fn merge_records(
    records: &mut BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
    more: BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
) {
    for (partition, offsets) in more {
        records.entry(partition).or_default().extend(offsets);
    }
}

/// Retention deletes records the group had not archived yet: the member that resumes at the
/// committed offset finds it below the log start. It does not jump silently: it counts the
/// reset, the next batch's manifest records the lost range as a `deleted` gap, `verify` names
/// that range, and every record that was still in the log is archived exactly once.
#[test]
fn records_deleted_before_they_were_archived_are_counted_recorded_and_reported() {
    let rig = Rig::start_mock(2);
    rig.produce(1_000, 3, 2, 61);
    rig.archive_to_the_end("first", 2, &[]);
    let mut records = rig.read_topic(2);
    let committed = end_offsets(&records);
    // Not archived before retention takes it: the next 1,000 records and more.
    let beyond: BTreeMap<i32, i64> = committed.iter().map(|(p, c)| (*p, c + 500)).collect();
    let log_starts = produce_until_retention_passes(&rig, &beyond, 2_000, 62);
    merge_records(&mut records, rig.read_topic(2));
    let ends = end_offsets(&records);

    let metrics = take_over(
        &rig,
        &ends,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    assert_eq!(
        metrics.get("archiver_offset_resets_total"),
        Some(&2.0),
        "one reset per partition"
    );

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    // `records` holds what was read before retention and what it left: the deleted records were
    // never read, so they are in no object and expected in none.
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);

    let (clean, report) = rig.verify(true);
    assert!(!clean, "verify must report the deleted ranges: {report:#}");
    let findings = report["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 2, "{report:#}");
    for finding in findings {
        let partition = finding["partition"].as_i64().expect("partition") as i32;
        assert_eq!(finding["kind"], "deleted-before-archived", "{report:#}");
        let range = format!(
            "offsets {}..{}",
            committed[&partition],
            log_starts[&partition] - 1
        );
        assert!(
            finding["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("{range} were")),
            "partition {partition}: {range} expected in {finding}"
        );
    }
}

/// Retention passes a running member's position (issue 19, finding 1): S3 refuses every write,
/// the disk budget fills, the partition pauses, and the mock cluster's size retention deletes
/// what the member had not read; S3 comes back, the partition resumes and librdkafka resets it
/// to the log start. The jump is not filed as offsets without records: it is counted, the
/// manifest records it as `deleted`, `verify` names it, and every record the member read before
/// or found in the log after is archived exactly once.
#[test]
fn retention_passing_a_paused_member_is_reported_as_deleted_not_as_no_record() {
    let rig = Rig::start_mock(1);
    let proxy = FaultProxy::start(rig.s3.port, FaultRates::default(), 19);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_S3_ENDPOINT_URL", &proxy.endpoint()),
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_S3_RETRY_MAX_BACKOFF_MS", "500"),
            // The smallest budget these caps allow (two batches): the partition pauses soon.
            ("ARCHIVER_BUFFER_MAX_BATCH_BYTES", "524288"),
            ("ARCHIVER_BUFFER_MAX_FILE_BYTES", "524288"),
            ("ARCHIVER_BUFFER_MAX_DISK_BYTES", "1048576"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !archiver.log_text().contains("partitions assigned") {
        assert!(Instant::now() < deadline, "{}", archiver.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    proxy.set_rates(FaultRates {
        refuse_with: Some("AccessDenied"),
        ..FaultRates::default()
    });
    // Until the disk budget pauses the partition, then a little longer, so that what it read is
    // settled.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seed = 190;
    // Retention deletes early records meanwhile, after the member read them: the test reads
    // each chunk before the next (a chunk is well below the 5 MB retention keeps).
    let mut expected: BTreeMap<i32, BTreeMap<i64, Vec<u8>>> = BTreeMap::new();
    while archiver.scrape().get("archiver_paused_partitions") != Some(&1.0) {
        assert!(
            Instant::now() < deadline,
            "never paused:\n{}",
            archiver.log_text()
        );
        rig.produce(1_000, 3, 2, seed);
        merge_records(&mut expected, rig.read_topic(1));
        seed += 1;
    }
    std::thread::sleep(Duration::from_secs(3));
    let read = archiver.scrape()["archiver_records_consumed_total"] as i64;
    expected
        .get_mut(&0)
        .unwrap()
        .retain(|offset, _| *offset < read);
    let beyond: BTreeMap<i32, i64> = [(0, read + 100)].into();
    let log_starts = produce_until_retention_passes(&rig, &beyond, 2_000, seed);
    merge_records(&mut expected, rig.read_topic(1));
    let ends = end_offsets(&rig.read_topic(1));

    proxy.set_rates(FaultRates::default());
    rig.wait_committed(&ends, Duration::from_secs(180), &mut [&mut archiver]);
    let metrics = archiver.scrape();
    assert!(archiver.terminate(Duration::from_secs(40)).success());
    assert_eq!(
        metrics.get("archiver_offset_resets_total"),
        Some(&1.0),
        "the reset is counted:\n{}",
        archiver.log_text()
    );
    assert!(
        archiver.log_text().contains("before they were archived"),
        "and logged"
    );

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &expected, None);
    let mut deleted = Vec::new();
    for manifest in rig.s3.manifests(&rig.dir.path().join("manifests")) {
        for gap in manifest["gaps"].as_array().into_iter().flatten() {
            let range = (
                gap["first"].as_i64().unwrap(),
                gap["last"].as_i64().unwrap(),
            );
            assert_eq!(
                gap["cause"], "deleted",
                "the mock cluster compacts nothing: {gap}"
            );
            deleted.push(range);
        }
    }
    assert_eq!(
        deleted,
        vec![(read, log_starts[&0] - 1)],
        "what was neither read before nor left after is the deleted range"
    );
    let (clean, report) = rig.verify(true);
    assert!(!clean, "verify must report the deleted range: {report:#}");
    let findings = report["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 1, "{report:#}");
    assert_eq!(findings[0]["kind"], "deleted-before-archived", "{report:#}");
}

/// Retention deletes the head of a batch whose objects went up but whose manifest did not (an
/// intent recorded, the member killed). The next owner counts the reset and records the deleted
/// range in the batch's manifest; it cuts where the first attempt did (the files the bucket
/// keeps with the intent), so the earlier attempt's objects, the only copy of the deleted
/// records, are found in place, left as they are and listed in its manifest; every record is in
/// the bucket once; and `verify` names the deleted range.
#[test]
fn a_replay_whose_head_was_deleted_is_reported_and_adopts_the_earlier_objects() {
    let rig = Rig::start_mock(2);
    // Small record batches, so that retention can take the head of the archiver's batch and
    // leave its tail; many sources (400 files a partition), so that some files of the batch
    // begin in the part retention takes and others after it.
    for run in 0..10 {
        rig.produce(300, 200, 2, 710 + run);
    }
    let uploaded = interrupt_before_the_manifests(&rig, 7, &[]);
    assert!(!uploaded.is_empty());
    let intents: BTreeMap<i32, (i64, i64)> = rig
        .committed_with_metadata(2)
        .into_iter()
        .map(|(p, (_, metadata))| {
            let intent: serde_json::Value =
                serde_json::from_str(&metadata).expect("an intent is recorded");
            let offset = |field: &str| intent[field].as_i64().expect("intent range");
            (p, (offset("start"), offset("end")))
        })
        .collect();
    let mut records = rig.read_topic(2);
    let starts: BTreeMap<i32, i64> = intents.iter().map(|(p, (s, _))| (*p, *s)).collect();
    let log_starts = produce_until_retention_passes(&rig, &starts, 400, 72);
    for (p, start) in &log_starts {
        assert!(
            *start <= intents[p].1,
            "partition {p}: retention took the whole batch {:?} (log start {start}); the test needs its tail",
            intents[p]
        );
    }
    merge_records(&mut records, rig.read_topic(2));
    let ends = end_offsets(&records);

    let metrics = take_over(
        &rig,
        &ends,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    assert_eq!(metrics.get("archiver_offset_resets_total"), Some(&2.0));
    let after = rig.s3.versions();
    for (key, version) in &uploaded {
        assert_eq!(after.get(key), Some(version), "{key} was rewritten");
    }

    // Every record is in the bucket once: the deleted ones in the earlier attempt's objects.
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let mut archived: HashMap<Vec<u8>, usize> = HashMap::new();
    for line in archived_objects(&out, &rig.topic)
        .into_iter()
        .flat_map(|object| object.lines)
    {
        *archived.entry(line).or_default() += 1;
    }
    for (partition, offsets) in &records {
        let copies = |payload: &Vec<u8>| archived.get(payload).copied().unwrap_or(0);
        let missing: Vec<i64> = offsets
            .iter()
            .filter(|(_, payload)| copies(payload) == 0)
            .map(|(offset, _)| *offset)
            .collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: lost {missing:?}"
        );
        let twice: Vec<i64> = offsets
            .iter()
            .filter(|(_, payload)| copies(payload) > 1)
            .map(|(offset, _)| *offset)
            .collect();
        assert!(twice.is_empty(), "partition {partition}: twice {twice:?}");
    }

    let (clean, report) = rig.verify(false);
    assert!(!clean, "verify must report the replay's loss: {report:#}");
    let findings = report["findings"].as_array().expect("findings");
    for (partition, log_start) in &log_starts {
        let range = format!("offsets {}..{}", intents[partition].0, log_start - 1);
        assert!(
            findings
                .iter()
                .any(|f| f["kind"] == "deleted-before-archived"
                    && f["partition"] == *partition
                    && f["detail"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("{range} were"))),
            "partition {partition}: {range} not reported: {report:#}"
        );
    }
    // The earlier objects, those whose first record was deleted too, are the replay's: it cut
    // where the first attempt did (the files kept with the intent), found each in place, and
    // its manifest lists them. None is left beside the replay's objects.
    let unlisted: Vec<&str> = findings
        .iter()
        .filter(|f| f["kind"] == "extra-object")
        .map(|f| f["detail"].as_str().unwrap())
        .collect();
    assert!(
        unlisted.is_empty(),
        "objects no manifest lists: {unlisted:?}"
    );
    let head_deleted = uploaded
        .keys()
        .filter(|key| {
            let name = key.rsplit('/').next().unwrap().trim_end_matches(".gz");
            let mut fields = name.rsplitn(3, '-');
            let first_offset: i64 = fields.next().unwrap().parse().unwrap();
            let partition: i32 = fields.next().unwrap().parse().unwrap();
            first_offset < log_starts[&partition]
        })
        .count();
    eprintln!(
        "intents {intents:?}, log starts {log_starts:?}: {head_deleted} of {} earlier objects lost their first record",
        uploaded.len()
    );
    assert!(head_deleted > 0, "no earlier object lost its first record");
    assert!(
        head_deleted < uploaded.len(),
        "every earlier object lost its first record: the test needs some that kept it"
    );
}

/// An object the batch cannot account for holds one of its keys (here: other lines, put by
/// something else while the batch waited to be replayed). The member neither replaces it nor
/// retries in silence: readiness turns off naming the key, a gauge the alert reads counts it, and
/// once the operator moves the object away the batch goes up and the partition goes on.
#[test]
fn an_object_with_other_lines_at_a_key_turns_readiness_off_naming_it() {
    let rig = Rig::start_mock(2);
    rig.produce(2_000, 3, 2, 81);
    let uploaded = interrupt_before_the_manifests(&rig, 5, &[]);
    let key = uploaded.keys().next().expect("an object put").clone();
    let foreign = rig.dir.path().join("foreign.gz");
    std::fs::write(&foreign, b"{\"not\":\"the batch's lines\"}\n").unwrap();
    let s3_uri = format!("s3://{BUCKET}/{key}");
    rig.s3.aws(&[
        "s3",
        "cp",
        "--only-show-errors",
        foreign.to_str().unwrap(),
        &s3_uri,
    ]);

    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let mut second = rig.archiver(
        "second",
        &rig.dir.path().join("second-volume"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_S3_RETRY_MAX_BACKOFF_MS", "500"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = second.http_get("/readyz");
        if status == 503 && body.contains(&key) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never named {key}: {status} {body}\n{}",
            second.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("other lines"), "{body}");
    assert_eq!(second.scrape().get("archiver_object_conflicts"), Some(&1.0));
    // Several retries later the object is still the foreign one, and the error said so once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rig.s3.head(&key)["ContentLength"],
        serde_json::json!(std::fs::metadata(&foreign).unwrap().len()),
        "the foreign object was replaced"
    );
    let log = second.log_text();
    let reported = log
        .lines()
        .filter(|line| line.contains("holds the key") && line.contains(&key))
        .count();
    assert_eq!(reported, 1, "{log}");

    // The operator moves the object away: the batch goes up, readiness comes back.
    rig.s3.aws(&["s3", "rm", "--only-show-errors", &s3_uri]);
    rig.wait_committed(&ends, Duration::from_secs(60), &mut [&mut second]);
    let (status, body) = second.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(second.scrape().get("archiver_object_conflicts"), Some(&0.0));
    assert!(second.terminate(Duration::from_secs(40)).success());
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep found problems: {report:#}");
}
