//! Suppression end to end (librdkafka's mock cluster, moto, the archiver as a process): an
//! operator suppresses users with `kafka-s3-archiver suppress` while the group runs; from each
//! partition's next batch their events are left out, recorded in the manifests, counted, and
//! still left out after a restart; `verify --deep` stays clean, and no id is in the clear in the
//! bucket or the logs; a restore of the range sends none of their events back. And `forget`
//! takes users out of what is already archived (events and dead letters, over sources, days and
//! partitions, a versioned bucket's earlier versions too) while the group runs and replays a
//! batch, through a kill of its own: afterwards no object holds their events, every other one
//! is there exactly once, `verify --deep` is clean and a restore sends none of them. Last,
//! `forget`'s question to Kafka (does a record lie between a commit and the end?) is answered
//! while the topic is being written.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

use support::s3_proxy::{FaultProxy, FaultRates};
use support::*;

const PARTITIONS: u32 = 4;
/// The generator draws users from `user-0` to `user-49999`: a tenth of them are suppressed.
const SUPPRESSED_USERS: u32 = 5_000;

fn suppressed(payload: &[u8]) -> bool {
    let event: serde_json::Value = serde_json::from_slice(payload).expect("an event");
    event["userId"]
        .as_str()
        .and_then(|user| user.strip_prefix("user-"))
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n < SUPPRESSED_USERS)
}

fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn suppressed_users_are_left_out_from_the_next_batch_on_through_a_restart() {
    let rig = Rig::start_mock(PARTITIONS);
    let data = rig.dir.path().join("data");
    let settings = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_SUPPRESSION_REFRESH_SECS", "1"),
    ];
    let mut archiver = rig.archiver("archiver", &data, &settings);
    rig.produce(2_000, 3, 2, 1);
    let before = end_offsets(&rig.read_topic(PARTITIONS));
    rig.wait_committed(&before, Duration::from_secs(120), &mut [&mut archiver]);

    let ids: String = (0..SUPPRESSED_USERS)
        .map(|n| format!("user-{n}\n"))
        .collect();
    let file = rig.dir.path().join("ids.txt");
    std::fs::write(&file, ids).unwrap();
    let answer = rig.command_ok(&["suppress", "--ids-file", file.to_str().unwrap()]);
    assert!(
        answer.contains(&format!("{SUPPRESSED_USERS} ids added")),
        "{answer}"
    );
    eventually(
        "the member to take the list up",
        Duration::from_secs(30),
        || archiver.log_text().contains("suppression list taken up"),
    );

    rig.produce(2_000, 3, 2, 2);
    let middle = end_offsets(&rig.read_topic(PARTITIONS));
    rig.wait_committed(&middle, Duration::from_secs(120), &mut [&mut archiver]);
    let suppressed_by_first = archiver.scrape()["archiver_records_suppressed_total"];
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());
    let first_log = archiver.log_text();

    // A restart reads the list before it consumes anything.
    let mut archiver = rig.archiver("archiver-restarted", &data, &settings);
    rig.produce(2_000, 3, 2, 3);
    let records = rig.read_topic(PARTITIONS);
    rig.wait_committed(
        &end_offsets(&records),
        Duration::from_secs(120),
        &mut [&mut archiver],
    );
    let suppressed_by_second = archiver.scrape()["archiver_records_suppressed_total"];
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    let archived = multiset(objects.iter().flat_map(|o| &o.lines).map(Vec::as_slice));
    let mut left_out: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    let mut kept_before = 0;
    for (&partition, offsets) in &records {
        for (&offset, payload) in offsets {
            let count = archived.get(payload.as_slice()).copied().unwrap_or(0);
            let after = offset >= before[&partition];
            if after && suppressed(payload) {
                assert_eq!(count, 0, "partition {partition} offset {offset}: archived");
                left_out
                    .entry(i64::from(partition))
                    .or_default()
                    .insert(offset);
            } else {
                assert_eq!(count, 1, "partition {partition} offset {offset}");
                kept_before += usize::from(!after && suppressed(payload));
            }
        }
    }
    let left_out_count: usize = left_out.values().map(BTreeSet::len).sum();
    assert!(
        left_out_count > 200 && kept_before > 100,
        "a tenth of 4,000 events after and of 2,000 before: {left_out_count}, {kept_before}"
    );

    // The manifests name every offset left out, as a `suppressed` gap, and only those.
    let mut recorded: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for manifest in rig.s3.manifests(&out.join("m")) {
        let (Some(partition), Some(gaps)) =
            (manifest["partition"].as_i64(), manifest["gaps"].as_array())
        else {
            continue;
        };
        for gap in gaps.iter().filter(|gap| gap["cause"] == "suppressed") {
            let (first, last) = (
                gap["first"].as_i64().unwrap(),
                gap["last"].as_i64().unwrap(),
            );
            recorded.entry(partition).or_default().extend(first..=last);
        }
    }
    assert_eq!(recorded, left_out);
    // Counted as read: a batch read twice (a rebalance's replay) counts its records twice.
    let counted = (suppressed_by_first + suppressed_by_second) as usize;
    assert!(
        counted >= left_out_count,
        "archiver_records_suppressed_total {counted} < {left_out_count}"
    );

    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep: {report:#}");
    let reported: u64 = report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["records_suppressed"].as_u64().unwrap())
        .sum();
    assert_eq!(reported as usize, left_out_count);

    // A restore of the whole range brings none of them back, not even those archived before
    // the request.
    let answer = restore_the_whole_range(&rig);
    assert!(
        answer.contains(&format!(
            "left out, as lines of suppressed users: {kept_before}"
        )),
        "{answer}"
    );
    let restored = rig.read_messages("restored", 2);
    let payloads: Vec<&[u8]> = restored
        .values()
        .flat_map(|messages| messages.values())
        .map(|message| message.payload.as_slice())
        .collect();
    let total: usize = records.values().map(BTreeMap::len).sum();
    assert_eq!(payloads.len(), total - left_out_count - kept_before);
    assert!(payloads.iter().all(|payload| !suppressed(payload)));

    // Hashes only: no suppressed id in the bucket's suppression objects or the logs.
    for (key, path) in files_under(&out) {
        if key.contains("_suppression") {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(!text.contains("user-"), "{key} holds an id in the clear");
        }
    }
    for log in [first_log, archiver.log_text()] {
        assert!(
            !log.contains("\"user-") && !log.contains("=user-"),
            "an id in a log"
        );
    }
}

fn forgotten(payload: &[u8]) -> bool {
    suppressed(payload)
}

/// Dead letters naming users over the partitions, forgotten users' and others': by the record
/// they keep (an event without a source) or by their Kafka key (a record that is not JSON).
/// Answers each one's payload and whether it names a forgotten user.
fn produce_dead_letters(rig: &Rig, round: u32) -> Vec<(Vec<u8>, bool)> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", rig.broker.bootstrap())
        .create()
        .unwrap();
    let mut sent = Vec::new();
    for n in 0..16 {
        let user = match n % 2 {
            0 => n * 7,
            _ => SUPPRESSED_USERS + n * 11,
        };
        let (key, payload) = match n % 4 {
            0 | 1 => (
                format!("k-{round}-{n}"),
                format!(
                    r#"{{"type":"track","userId":"user-{user}","messageId":"dead-{round}-{n}"}}"#
                ),
            ),
            _ => (format!("user-{user}"), format!("not json {round}-{n}")),
        };
        let record = BaseRecord::to(&rig.topic)
            .partition((n % PARTITIONS) as i32)
            .key(key.as_bytes())
            .payload(payload.as_bytes());
        producer.send(record).map_err(|(err, _)| err).unwrap();
        sent.push((payload.into_bytes(), user < SUPPRESSED_USERS));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    sent
}

/// How often each record a dead letter in `dir` keeps is there.
fn dead_lettered(dir: &std::path::Path) -> HashMap<Vec<u8>, usize> {
    let mut kept = HashMap::new();
    for (key, path) in files_under(dir) {
        if !key.starts_with("segment-logs/_dead-letter/") || !key.ends_with(".gz") {
            continue;
        }
        let content = gunzip_single_member(&path);
        for line in content.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let letter: serde_json::Value = serde_json::from_slice(line).unwrap();
            let payload = base64::engine::general_purpose::STANDARD
                .decode(letter["payload_base64"].as_str().unwrap())
                .unwrap();
            *kept.entry(payload).or_default() += 1;
        }
    }
    kept
}

/// `restore` of every day the tests produce into a new topic `restored`; returns its output.
fn restore_the_whole_range(rig: &Rig) -> String {
    rig.broker.create_topic("restored", 2);
    rig.command_ok(&[
        "restore",
        "--topic",
        "restored",
        "--from",
        "2026-11-20",
        "--to",
        "2026-11-21",
    ])
}

/// `forget` run as an operator runs it, with the rig's settings and members that read the
/// suppression requests every second.
fn forget_command(rig: &Rig, ids: &std::path::Path) -> std::process::Command {
    let mut command = rig.command(&["forget", "--ids-file", ids.to_str().unwrap()]);
    command.env("ARCHIVER_SUPPRESSION_REFRESH_SECS", "1");
    command
}

#[test]
fn forgotten_users_are_taken_out_of_the_archive_while_the_group_runs_through_a_kill() {
    let rig = Rig::start_mock(PARTITIONS);
    // A versioned bucket keeps each rewritten object's earlier version: forget deletes them.
    rig.s3.enable_versioning();
    let data = rig.dir.path().join("data");
    let settings = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_SUPPRESSION_REFRESH_SECS", "1"),
    ];
    // Every request to S3 is delayed and a few fail: forget is killed while it rewrites, and
    // the member while it uploads a batch.
    let proxy = FaultProxy::start(
        rig.s3.port,
        FaultRates {
            internal_error: 0.05,
            delay: 1.0,
            delay_ms: 50,
            ..FaultRates::default()
        },
        7,
    );
    let endpoint = proxy.endpoint();
    let through_proxy = [
        settings.as_slice(),
        &[("ARCHIVER_S3_ENDPOINT_URL", endpoint.as_str())],
    ]
    .concat();
    let mut archiver = rig.archiver("archiver", &data, &through_proxy);
    rig.produce(3_000, 3, 2, 1);
    let mut dead_letters = produce_dead_letters(&rig, 1);
    let before = end_offsets(&rig.read_topic(PARTITIONS));
    rig.wait_committed(&before, Duration::from_secs(120), &mut [&mut archiver]);

    let ids: String = (0..SUPPRESSED_USERS)
        .map(|n| format!("user-{n}\n"))
        .collect();
    let file = rig.dir.path().join("ids.txt");
    std::fs::write(&file, ids).unwrap();

    // Forget while events keep coming; kill -9 it while it rewrites, one object at a time.
    let mut command = forget_command(&rig, &file);
    command
        .args(["--concurrency", "1"])
        .env("ARCHIVER_S3_ENDPOINT_URL", &endpoint);
    let mut forget = Process::spawn(command, rig.dir.path().join("forget.log"));
    rig.produce(1_000, 3, 2, 2);
    dead_letters.extend(produce_dead_letters(&rig, 2));
    // The member dies while it uploads a batch (its intent committed, its objects not yet) and
    // another takes over on a fresh volume: it replays the batch, under the list it was cut
    // with, while forget waits for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig
        .committed_with_metadata(PARTITIONS)
        .values()
        .all(|(_, intent)| intent.is_empty())
    {
        assert!(Instant::now() < deadline, "no batch was uploaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    archiver.kill9();
    let fresh = rig.dir.path().join("fresh");
    let mut archiver = rig.archiver("archiver-again", &fresh, &settings);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !forget.log_text().contains("journal stored") {
        assert!(
            forget.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "forget ended or stalled before its journal: {}",
            forget.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    forget.kill9();
    assert!(
        !rig.s3.keys().iter().any(|k| k.ends_with("/audit.json")),
        "forget finished before the kill: {}",
        forget.log_text()
    );
    let output = forget_command(&rig, &file).output().unwrap();
    let answer = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{answer}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        forget.log_text()
    );
    assert!(answer.contains("(resumed)"), "{answer}");
    // Killed part-way: the rerun finds some objects rewritten and puts the rest.
    let put = number_after(&answer, "put");
    let found = number_after(&answer, "objects (");
    assert!(put > 0 && found > 0, "{answer}");

    // New events of the forgotten users are not archived.
    rig.produce(1_000, 3, 2, 3);
    dead_letters.extend(produce_dead_letters(&rig, 3));
    let records = rig.read_topic(PARTITIONS);
    rig.wait_committed(
        &end_offsets(&records),
        Duration::from_secs(120),
        &mut [&mut archiver],
    );
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());
    assert!(
        archiver
            .log_text()
            .contains("replaying the batch an interrupted upload recorded"),
        "no batch was replayed"
    );

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    let archived = multiset(objects.iter().flat_map(|o| &o.lines).map(Vec::as_slice));
    let dead: HashMap<&[u8], bool> = dead_letters
        .iter()
        .map(|(payload, forgotten)| (payload.as_slice(), *forgotten))
        .collect();
    let kept = dead_lettered(&out);
    let (mut gone, mut events, mut events_gone) = (0, 0, 0);
    for (&partition, offsets) in &records {
        for (&offset, payload) in offsets {
            if let Some(&forgotten) = dead.get(payload.as_slice()) {
                let count = kept.get(payload).copied().unwrap_or(0);
                let expected = usize::from(!forgotten);
                assert_eq!(count, expected, "dead letter at {partition}/{offset}");
                gone += usize::from(forgotten);
                continue;
            }
            let count = archived.get(payload.as_slice()).copied().unwrap_or(0);
            events += 1;
            if forgotten(payload) {
                assert_eq!(
                    count, 0,
                    "partition {partition} offset {offset}: still archived"
                );
                gone += 1;
                events_gone += 1;
            } else {
                assert_eq!(count, 1, "partition {partition} offset {offset}");
            }
        }
    }
    assert!(gone > 300, "a tenth of 5,000 events: {gone}");

    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep: {report:#}");
    let sum = |field: &str| -> u64 {
        report["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[field].as_u64().unwrap())
            .sum()
    };
    let (taken_out, left_out) = (sum("records_forgotten"), sum("records_suppressed"));
    assert_eq!(taken_out + left_out, gone as u64, "{report:#}");
    assert!(
        taken_out > 200,
        "the events archived before the request: {taken_out}"
    );

    // No earlier version of an archived object is left to hold their events.
    let left: Vec<String> = rig
        .s3
        .noncurrent_versions()
        .into_keys()
        .filter(|key| key.ends_with(".gz") || key.ends_with(".zst"))
        .collect();
    assert!(left.is_empty(), "earlier versions left: {left:?}");
    assert!(
        answer.contains("earlier versions of rewritten objects"),
        "{answer}"
    );

    // The id index: a request for one user reads only the objects that may hold them.
    let one = rig.command_ok(&["forget", "--id", "user-49999", "--dry-run"]);
    let (read, selection) = (number_after(&one, "read"), number_after(&one, " of "));
    assert!(
        selection > 20 && read <= (selection / 10).max(2),
        "the index should rule out most objects: {one}"
    );

    // Run again: the same request, found done; nothing is put again.
    let again = rig.command_ok(&["forget", "--ids-file", file.to_str().unwrap()]);
    assert!(again.contains("put 0 objects"), "{again}");

    // The journal and the audit record name ids by their hashes only.
    for (key, path) in files_under(&out) {
        if key.contains("_forget") || key.contains("_suppression") {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(!text.contains("user-"), "{key} holds an id in the clear");
        }
    }
    let audits: Vec<_> = files_under(&out)
        .into_iter()
        .filter(|(key, _)| key.ends_with("/audit.json"))
        .collect();
    assert_eq!(audits.len(), 1, "one request, one audit record");
    let audit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&audits[0].1).unwrap()).unwrap();
    assert_eq!(audit["lines_removed"].as_u64(), Some(taken_out));

    // A restore of the range sends none of their events back.
    let answer = restore_the_whole_range(&rig);
    let restored = rig.read_messages("restored", 2);
    let payloads: Vec<&[u8]> = restored
        .values()
        .flat_map(|messages| messages.values())
        .map(|message| message.payload.as_slice())
        .collect();
    assert_eq!(payloads.len(), events - events_gone, "{answer}");
    assert!(payloads.iter().all(|payload| !forgotten(payload)));
}

/// `forget`'s wait asks Kafka whether any record lies between a partition's commit and its end
/// (`consume::lag::records_between`). Here the range holds none (retention deleted it: the mock
/// cluster keeps 5 MB a partition) while a producer goes on writing past it: the first record
/// the partition yields is past the range, which settles it. Before, only a record inside the
/// range settled a partition and every record read restarted the idle wait, so on a topic
/// being written the question never came back.
#[test]
fn a_range_retention_emptied_is_judged_while_the_topic_is_written() {
    let rig = Rig::start_mock(1);
    // About 7 MB into the partition: its head goes.
    rig.produce_burst(0, 7_000, 1_000, 100_000, 61);
    let log_start = rig.log_starts(1)[&0];
    assert!(log_start > 0, "the mock cluster deleted nothing");
    let mut producer = rig.produce_in_background(1_000_000, 200, 4, 1, 62);
    let env = rig
        .env(&rig.dir.path().join("unused"))
        .into_iter()
        .filter(|(key, _)| key.starts_with("ARCHIVER_"));
    let config = kafka_s3_archiver::config::Config::load(None, env, &[]).expect("config");
    let (answer, answered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = answer.send(kafka_s3_archiver::consume::lag::records_between(
            &config,
            &[(0, 0, log_start)],
        ));
    });
    let found = answered.recv_timeout(Duration::from_secs(30));
    producer.terminate(Duration::from_secs(10));
    let found = found
        .expect("no answer in 30 s while the topic is written")
        .expect("records_between");
    assert_eq!(found.get(&0), Some(&false), "offsets 0..{log_start}");
}
