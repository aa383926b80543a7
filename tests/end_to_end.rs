//! End to end against real servers: tansu (Kafka protocol) and moto (S3 API) as separate
//! processes, the archiver as a process, the bucket read back with awscli.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::*;

/// UTC midnight of a day, in Segment's `epoch-ms` folder format.
fn epoch_ms_folder(day: &str) -> String {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
    (date.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() * 1000).to_string()
}

#[test]
fn archives_every_event_exactly_once_in_the_segment_layout() {
    let rig = Rig::start(4);
    let data = rig.dir.path().join("data");
    let mut archiver = rig.archiver(
        "archiver",
        &data,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    // Two waves, so every partition is cut into at least two scheduled batches.
    rig.produce(12_000, 5, 3, 1);
    let first_wave = rig.read_topic(4);
    rig.wait_committed(
        &end_offsets(&first_wave),
        Duration::from_secs(120),
        &mut [&mut archiver],
    );
    rig.produce(8_000, 5, 3, 2);
    let records = rig.read_topic(4);
    let ends = end_offsets(&records);
    assert_eq!(ends.values().sum::<i64>(), 20_000);
    assert_eq!(ends.len(), 4);
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut archiver]);
    // Let the next statistics round (every 5 s) report the lag of the caught-up partitions.
    std::thread::sleep(Duration::from_secs(6));
    let metrics = archiver.scrape();
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(
        status.success(),
        "SIGTERM should exit 0, got {status}:\n{}",
        archiver.log_text()
    );

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    assert_exactly_once(&objects, &records, None);

    let sources: BTreeSet<&str> = objects.iter().map(|o| o.source.as_str()).collect();
    let days: BTreeSet<&str> = objects.iter().map(|o| o.day.as_str()).collect();
    let partitions: BTreeSet<i32> = objects.iter().map(|o| o.partition).collect();
    assert_eq!(sources.len(), 5, "{sources:?}");
    assert_eq!(days.len(), 3, "{days:?}");
    let expected_days: BTreeSet<String> = ["2026-11-20", "2026-11-21", "2026-11-22"]
        .into_iter()
        .map(epoch_ms_folder)
        .collect();
    assert_eq!(days, expected_days.iter().map(String::as_str).collect());
    assert_eq!(partitions.len(), 4);

    // Batches were cut by the schedule: at least two per partition.
    let log = archiver.log_text();
    // tansu drops commit metadata; the archiver said so and went on at-least-once.
    assert_eq!(metrics["archiver_exactly_once_degraded"], 1.0, "{log}");
    let sealed = log_events(&log, "batch sealed");
    for partition in 0..4 {
        let batches = sealed
            .iter()
            .filter(|e| e["partition"] == partition.to_string() && e["trigger"] == "schedule")
            .count();
        assert!(
            batches >= 2,
            "partition {partition}: {batches} scheduled batches\n{log}"
        );
    }

    // The service's own account agrees with the bucket.
    let metric = |name: &str| {
        metrics
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} not exported"))
    };
    assert_eq!(metric("archiver_records_consumed_total"), 20_000.0);
    assert_eq!(metric("archiver_records_written_total"), 20_000.0);
    assert_eq!(
        metric("archiver_objects_uploaded_total"),
        objects.len() as f64
    );
    assert_eq!(metric("archiver_assigned_partitions"), 4.0);
    assert!(metric("archiver_batches_uploaded_total") >= 8.0);
    assert!(metric("archiver_commits_total") >= 8.0);
    assert_eq!(metric("archiver_commit_errors_total"), 0.0);
    assert!(metric("archiver_last_upload_timestamp_seconds") > 1.7e9);
    assert_eq!(metric("archiver_build_info{version=\"0.1.0\"}"), 1.0);
    for partition in 0..4 {
        let age =
            format!("archiver_oldest_unuploaded_record_age_seconds{{partition=\"{partition}\"}}");
        assert_eq!(metric(&age), 0.0, "nothing is waiting for upload");
        let lag = format!("archiver_consumer_lag_records{{partition=\"{partition}\"}}");
        assert_eq!(metric(&lag), 0.0);
    }
    assert!(metrics.contains_key("archiver_upload_duration_seconds_count"));
    assert!(metrics["archiver_seal_duration_seconds_count"] >= 1.0);
    assert!(metrics.contains_key("archiver_process_resident_memory_bytes"));

    // Object metadata and headers, on one object of each partition.
    for partition in 0..4 {
        let object = objects.iter().find(|o| o.partition == partition).unwrap();
        let head = rig.s3.head(&object.key);
        let meta = &head["Metadata"];
        assert_eq!(meta["topic"], rig.topic.as_str());
        assert_eq!(meta["partition"], partition.to_string().as_str());
        assert_eq!(
            meta["first-offset"],
            object.first_offset.to_string().as_str()
        );
        assert_eq!(
            meta["record-count"],
            object.lines.len().to_string().as_str()
        );
        assert_eq!(meta["format-version"], "1");
        let start: i64 = meta["batch-start"].as_str().unwrap().parse().unwrap();
        let end: i64 = meta["batch-end"].as_str().unwrap().parse().unwrap();
        assert!(
            start <= object.first_offset && object.first_offset <= end,
            "{head}"
        );
        assert_eq!(head["ContentEncoding"], "gzip");
        assert_eq!(head["ContentType"], "text/plain");
    }
}

#[test]
fn the_size_caps_cut_files_and_seal_batches_early_and_sigusr1_uploads_the_rest() {
    let rig = Rig::start(1);
    rig.produce(6_000, 3, 1, 3);
    let records = rig.read_topic(1);
    let end = end_offsets(&records)[&0];
    let data = rig.dir.path().join("data");
    // The schedule fires once a day: only the size caps can cut here.
    let mut archiver = rig.archiver(
        "archiver",
        &data,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "86400"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_BUFFER_MAX_FILE_BYTES", "100000"),
            ("ARCHIVER_BUFFER_MAX_BATCH_BYTES", "1048576"),
        ],
    );
    // Every full 1 MiB batch gets committed; the remainder stays buffered.
    let deadline = Instant::now() + Duration::from_secs(120);
    let committed = loop {
        let committed = rig.committed(1)[&0].unwrap_or(0);
        if committed >= end - 1300 {
            break committed;
        }
        assert!(
            Instant::now() < deadline,
            "committed only {committed} of {end}:\n{}",
            archiver.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let sealed = |metrics: &BTreeMap<String, f64>, trigger: &str| {
        metrics[&format!("archiver_batches_sealed_total{{trigger=\"{trigger}\"}}")]
    };
    let metrics = archiver.scrape();
    let by_size = sealed(&metrics, "batch-size");
    assert!(by_size >= 4.0, "{}", archiver.log_text());
    for other in ["schedule", "requested", "disk-pressure"] {
        assert_eq!(sealed(&metrics, other), 0.0, "{other}");
    }
    assert!(committed < end, "the remainder is below the batch cap");

    // The rest waits for tomorrow's schedule, unless an operator asks for it now.
    let deadline = Instant::now() + Duration::from_secs(60);
    while archiver.scrape()["archiver_records_written_total"] < end as f64 {
        assert!(Instant::now() < deadline, "{}", archiver.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    archiver.signal("USR1");
    rig.wait_committed(
        &BTreeMap::from([(0, end)]),
        Duration::from_secs(60),
        &mut [&mut archiver],
    );
    let metrics = archiver.scrape();
    assert_eq!(
        sealed(&metrics, "requested"),
        1.0,
        "{}",
        archiver.log_text()
    );
    assert_eq!(sealed(&metrics, "batch-size"), by_size);
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    assert_exactly_once(&objects, &records, None);
    let longest_line = records[&0].values().map(Vec::len).max().unwrap() + 1;
    let mut cut = 0;
    for object in &objects {
        assert!(
            object.uncompressed_len < 100_000 + longest_line,
            "{}: {} bytes",
            object.key,
            object.uncompressed_len
        );
        if object.uncompressed_len >= 100_000 {
            cut += 1;
        }
    }
    assert!(cut >= 10, "only {cut} files reached the file cap");
}

#[test]
fn a_killed_archiver_resumes_from_its_local_checkpoint() {
    // The mock cluster, not tansu: tansu 0.6 answers a fetch from the middle of a record batch
    // with the next batch, so a checkpoint that falls inside a batch (as it may) would lose the
    // rest of that batch in the broker's answer, not in the archiver.
    let rig = Rig::start_mock(2);
    let data = rig.dir.path().join("data");
    let no_uploads = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "86400"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_BUFFER_CHECKPOINT_INTERVAL_SECS", "1"),
    ];
    let mut first = rig.archiver("first", &data, &no_uploads);
    // The mock keeps up to 5 MB per partition: 6,000 events (~5.5 MB) over two partitions.
    rig.produce(4_000, 4, 2, 4);
    let wave = end_offsets(&rig.read_topic(2));
    let checkpointed = |partition: i32| -> Option<i64> {
        let path = data
            .join(format!("{}-{partition}", rig.topic))
            .join("checkpoint.json");
        let text = std::fs::read_to_string(path).ok()?;
        let checkpoint: serde_json::Value = serde_json::from_str(&text).ok()?;
        checkpoint["next_offset"].as_i64()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while wave.iter().any(|(&p, &end)| checkpointed(p) != Some(end)) {
        assert!(
            Instant::now() < deadline,
            "no checkpoint reached {wave:?}:\n{}",
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // More records arrive, and the process dies between two checkpoints.
    rig.produce(2_000, 4, 2, 5);
    std::thread::sleep(Duration::from_millis(400));
    first.kill9();
    // Nothing was uploaded yet: what the group holds is where each partition's archive
    // starts, committed when the member first met it.
    assert!(
        rig.committed(2).values().all(|c| c.unwrap_or(0) == 0),
        "nothing was uploaded yet: {:?}",
        rig.committed(2)
    );
    let at_kill: BTreeMap<i32, i64> = (0..2).map(|p| (p, checkpointed(p).unwrap())).collect();

    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let mut second = rig.archiver_after_kill(
        "second",
        &data,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut second]);
    let status = second.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", second.log_text());

    // Reading resumed at the last checkpoint, not at the committed offset (nothing): the only
    // records read again from Kafka are those after that checkpoint.
    let log = second.log_text();
    let resumed = log_events(&log, "partition resumed from local checkpoint");
    for (&partition, &offset) in &at_kill {
        assert!(
            offset >= wave[&partition],
            "checkpoint {offset} behind the first wave"
        );
        let event = resumed
            .iter()
            .find(|e| e["partition"] == partition.to_string())
            .unwrap_or_else(|| {
                panic!("partition {partition} did not resume from its checkpoint:\n{log}")
            });
        assert_eq!(event["resume_offset"], offset.to_string());
        eprintln!(
            "partition {partition}: resumed at {offset}, re-read {} of {} records",
            ends[&partition] - offset,
            ends[&partition]
        );
    }
    // The service's own count of what it read agrees: exactly the records after the checkpoints.
    let after_checkpoints: i64 = at_kill.iter().map(|(p, offset)| ends[p] - offset).sum();
    let stopped = log_events(&log, "archiver stopped");
    assert_eq!(stopped.len(), 1, "{log}");
    assert_eq!(
        stopped[0]["records_consumed"],
        after_checkpoints.to_string(),
        "{log}"
    );

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
}

/// tansu drops offset-commit metadata, where batch intents live: with exactly-once required the
/// archiver must refuse to go on, say why, and lose nothing.
#[test]
fn a_broker_that_drops_commit_metadata_stops_exactly_once_with_a_clear_error() {
    let rig = Rig::start(1);
    rig.produce(500, 2, 1, 21);
    let data = rig.dir.path().join("data");
    let mut archiver = rig.archiver(
        "archiver",
        &data,
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_KAFKA_EXACTLY_ONCE", "required"),
        ],
    );
    let status = archiver.wait_exit(Duration::from_secs(60));
    let log = archiver.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("dropped the metadata of an offset commit"),
        "{log}"
    );
    assert!(log.contains("kafka.exactly_once"), "{log}");
    // Nothing was uploaded past the intent, and the sealed batch is still on the volume.
    assert!(rig.s3.keys().iter().all(|k| !k.ends_with(".gz")));
    let checkpoint = std::fs::read_to_string(
        data.join(format!("{}-0", rig.topic))
            .join("checkpoint.json"),
    )
    .unwrap();
    assert!(checkpoint.contains("\"sealed\":[{"), "{checkpoint}");
}

/// A new `group.id` (or offsets expired by the broker) must not archive the retained log a
/// second time: the group has no commit, but the bucket's manifests say how far the archive
/// goes, and the new group resumes after them.
#[test]
fn a_group_without_offsets_resumes_after_the_bucket() {
    let rig = Rig::start(2);
    let schedule = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
    ];
    let mut first = rig.archiver("first", &rig.dir.path().join("first-volume"), &schedule);
    // Two waves, so the first group cuts at least two batches per partition.
    rig.produce(2_000, 3, 2, 31);
    rig.wait_committed(
        &end_offsets(&rig.read_topic(2)),
        Duration::from_secs(60),
        &mut [&mut first],
    );
    rig.produce(2_000, 3, 2, 32);
    rig.wait_committed(
        &end_offsets(&rig.read_topic(2)),
        Duration::from_secs(60),
        &mut [&mut first],
    );
    assert!(first.terminate(Duration::from_secs(40)).success());

    // The operator renames the group; new events arrive meanwhile.
    rig.produce(1_000, 3, 2, 33);
    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let group = [("ARCHIVER_KAFKA_GROUP_ID", "archiver-renamed")];
    let mut second = rig.archiver(
        "second",
        &rig.dir.path().join("second-volume"),
        &[schedule[0], schedule[1], group[0]],
    );
    rig.wait_committed_in(
        "archiver-renamed",
        &ends,
        Duration::from_secs(60),
        &mut [&mut second],
    );
    assert!(second.terminate(Duration::from_secs(40)).success());
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
    let resumed = log_events(
        &second.log_text(),
        "resuming after the newest manifest in the bucket",
    );
    assert_eq!(resumed.len(), 2, "{}", second.log_text());
}

/// Producers compress their batches with every codec Kafka has; the archive is the same.
#[test]
fn topics_produced_with_every_kafka_codec_are_archived_exactly() {
    let rig = Rig::start(2);
    for (seed, codec) in [(61, "gzip"), (62, "snappy"), (63, "lz4"), (64, "zstd")] {
        rig.produce_compressed(500, 3, 2, seed, codec);
    }
    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    assert_eq!(ends.values().sum::<i64>(), 2_000);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    rig.wait_committed(&ends, Duration::from_secs(60), &mut [&mut archiver]);
    assert!(archiver.terminate(Duration::from_secs(40)).success());
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
}
