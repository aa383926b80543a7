//! Bad input and user mistakes, against real servers: every message that is not an archivable
//! event lands in the dead letter with its reason and original bytes; every start-up mistake is
//! an error naming its cause; a bucket that refuses writes loses nothing; secrets never show.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};

use kafka_s3_archiver::kafka_client::headers as kafka_headers;

use kafka_s3_archiver::produce::{EventGenerator, GeneratorSettings};
use support::s3_proxy::{FaultProxy, FaultRates};
use support::*;

/// A payload (None: tombstone) and the dead-letter reason it should get (None: archived).
type Sent = (Option<Vec<u8>>, Option<&'static str>);
/// What the dead letter holds for an offset: reason and original bytes.
type Letter = (String, Option<Vec<u8>>);

/// One message to send: payload (None: tombstone), a `source-id` header, the expected reason.
struct Case {
    payload: Option<Vec<u8>>,
    header: Option<&'static str>,
    reason: Option<&'static str>,
}

fn bad(payload: &[u8], reason: &'static str) -> Case {
    Case {
        payload: Some(payload.to_vec()),
        header: None,
        reason: Some(reason),
    }
}

fn cases() -> Vec<Case> {
    let received = r#""receivedAt":"2026-11-20T10:00:00.000Z""#;
    let deep = format!(
        r#"{{"projectId":"srcA",{received},"x":{}1{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let large = format!(
        r#"{{"projectId":"srcA",{received},"pad":"{}"}}"#,
        "x".repeat(5_000)
    );
    vec![
        bad(b"hello, world", "not-json"),
        bad(br#"{"projectId":"srcA","receivedAt":"2026-11-20T10:0"#, "not-json"),
        bad(b"[1,2,3]", "not-object"),
        bad(br#""just a string""#, "not-object"),
        bad(b"42", "not-object"),
        bad(b"null", "not-object"),
        bad(b"{\"projectId\":\"srcA\",\"x\":\"\xff\xfe\"}", "not-utf8"),
        bad(b"{\"projectId\":\"srcA\",\"x\":\"a\0b\"}", "nul-byte"),
        bad(b"", "empty"),
        Case {
            payload: None,
            header: None,
            reason: Some("tombstone"),
        },
        bad(format!(r#"{{"type":"track",{received}}}"#).as_bytes(), "no-source"),
        bad(br#"{"projectId":"srcA","type":"track"}"#, "no-received-at"),
        bad(br#"{"projectId":"srcA","receivedAt":1732096800000}"#, "bad-received-at"),
        bad(br#"{"projectId":"srcA","receivedAt":"last tuesday"}"#, "bad-received-at"),
        bad(large.as_bytes(), "too-large"),
        bad(deep.as_bytes(), "too-deep"),
        bad(format!(r#"{{"projectId":"../../etc",{received}}}"#).as_bytes(), "bad-source-id"),
        bad(format!(r#"{{"projectId":"_manifests",{received}}}"#).as_bytes(), "bad-source-id"),
        Case {
            payload: Some(format!(r#"{{"projectId":"srcA",{received}}}"#).into_bytes()),
            header: Some("a/b"),
            reason: Some("bad-source-id"),
        },
        // Valid, but on several lines: archived, re-serialised on one line.
        Case {
            payload: Some(
                format!("{{\n  \"projectId\": \"srcA\",\n  \"messageId\": \"pretty-1\",\n  {received}\n}}\n")
                    .into_bytes(),
            ),
            header: None,
            reason: None,
        },
        // A header names the source, overriding the field.
        Case {
            payload: Some(format!(r#"{{"projectId":"srcA","messageId":"header-1",{received}}}"#).into_bytes()),
            header: Some("srcFromHeader"),
            reason: None,
        },
    ]
}

#[test]
fn every_bad_message_goes_to_the_dead_letter_with_its_reason() {
    let rig = Rig::start(2);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", rig.broker.bootstrap())
        .create()
        .unwrap();
    let mut generator = EventGenerator::new(GeneratorSettings {
        sources: 3,
        start_day: chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(),
        days: 2,
        near_midnight: 0.1,
        seed: 41,
        minimal: false,
        pad_bytes: 0,
    });
    // Good events interleaved with every bad class, on both partitions, in a known order.
    let mut sent: Vec<(i32, Sent)> = Vec::new();
    let cases = cases();
    for round in 0..2 {
        for case in &cases {
            for _ in 0..5 {
                let (_, good) = generator.next_event();
                sent.push((round, (Some(good.into_bytes()), None)));
            }
            sent.push((round, (case.payload.clone(), case.reason)));
        }
    }
    let mut header_of: HashMap<usize, &'static str> = HashMap::new();
    for (index, (partition, (payload, _))) in sent.iter().enumerate() {
        let case_header = cases
            .iter()
            .find(|c| c.payload == *payload && c.header.is_some())
            .and_then(|c| c.header);
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&rig.topic)
            .partition(*partition)
            .key(b"k".as_slice());
        if let Some(payload) = payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(value) = case_header {
            header_of.insert(index, value);
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "source-id",
                value: Some(value),
            }));
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_ROUTING_MAX_MESSAGE_BYTES", "4096"),
        ],
    );
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut archiver]);
    let metrics = archiver.scrape();
    assert!(
        archiver.terminate(Duration::from_secs(40)).success(),
        "{}",
        archiver.log_text()
    );

    // What was sent where: in partition order, the offsets follow the sending order.
    let mut expected: BTreeMap<(i32, i64), Sent> = BTreeMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for (partition, (payload, reason)) in &sent {
        let offset = next.entry(*partition).or_insert(0);
        expected.insert((*partition, *offset), (payload.clone(), *reason));
        *offset += 1;
    }
    assert_eq!(expected.len() as i64, ends.values().sum::<i64>());

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let mut archived: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut dead: BTreeMap<(i32, i64), Letter> = BTreeMap::new();
    for (key, path) in files_under(&out) {
        if key.starts_with("segment-logs/_manifests/") {
            continue;
        }
        let content = gunzip_single_member(&path);
        let lines = content.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        if key.starts_with("segment-logs/_dead-letter/") {
            assert!(
                key.starts_with(&format!("segment-logs/_dead-letter/{}/", rig.topic)),
                "{key}"
            );
            for line in lines {
                let letter: serde_json::Value = serde_json::from_slice(line).unwrap();
                let payload = letter["payload_base64"]
                    .as_str()
                    .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap());
                let at = (
                    letter["partition"].as_i64().unwrap() as i32,
                    letter["offset"].as_i64().unwrap(),
                );
                let previous = dead.insert(
                    at,
                    (letter["reason"].as_str().unwrap().to_string(), payload),
                );
                assert!(previous.is_none(), "{at:?} dead-lettered twice");
            }
        } else if !key.starts_with("segment-logs/_") {
            for line in lines {
                *archived.entry(line.to_vec()).or_insert(0) += 1;
            }
        }
    }

    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut expected_lines: HashMap<Vec<u8>, usize> = HashMap::new();
    for ((partition, offset), (payload, reason)) in &expected {
        match reason {
            Some(reason) => {
                let (got, original) = dead.remove(&(*partition, *offset)).unwrap_or_else(|| {
                    panic!("{partition}/{offset} ({reason}) is not in the dead letter")
                });
                assert_eq!(got, *reason, "{partition}/{offset}");
                assert_eq!(
                    &original, payload,
                    "{partition}/{offset}: original bytes differ"
                );
                *reasons.entry(reason).or_insert(0) += 1;
            }
            None => {
                let payload = payload.as_ref().unwrap();
                let line: Vec<u8> = payload
                    .iter()
                    .copied()
                    .filter(|&b| b != b'\n' && b != b'\r')
                    .collect();
                *expected_lines.entry(line).or_insert(0) += 1;
            }
        }
    }
    assert!(dead.is_empty(), "unexpected dead letters: {dead:?}");
    // Every good event as many times as it was sent (some payloads were sent twice), the
    // pretty-printed one on a single line.
    assert_eq!(archived.len(), expected_lines.len());
    for (line, count) in &expected_lines {
        assert_eq!(
            archived.get(line),
            Some(count),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    // The header source won over the field.
    assert!(files_under(&out)
        .keys()
        .any(|k| k.starts_with("segment-logs/srcFromHeader/")));
    // Every reason, counted by the metric.
    assert_eq!(reasons.len(), 12, "{reasons:?}");
    for (reason, count) in &reasons {
        let series = format!("archiver_records_dead_lettered_total{{reason=\"{reason}\"}}");
        assert_eq!(
            metrics.get(&series).copied(),
            Some(*count as f64),
            "{series}"
        );
    }
}

/// A header key that is not UTF-8 is legal on the wire (Go clients, the raw protocol send any
/// bytes), and rdkafka's own header reader panics on it: one such record used to stop every
/// member in turn, at the same offset after every restart. It is a `bad-header` dead letter that
/// keeps the key's bytes, everything around it is archived, and `restore --dead-letter` sends it
/// back byte for byte (its read-back of the target meets the key too, twice on a rerun).
#[test]
fn a_header_key_that_is_not_utf8_is_a_dead_letter_not_a_poison_pill() {
    let rig = Rig::start(1);
    rig.produce(100, 2, 1, 7);
    let payload =
        br#"{"projectId":"srcA","messageId":"hostile-1","receivedAt":"2026-11-20T10:00:00.000Z"}"#;
    let hostile_key: &[u8] = b"\xff\xfek";
    {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", rig.broker.bootstrap())
            .create()
            .unwrap();
        let headers = kafka_headers::insert(OwnedHeaders::new(), hostile_key, Some(b"v"));
        producer
            .send(
                BaseRecord::to(&rig.topic)
                    .key(b"k".as_slice())
                    .payload(payload.as_slice())
                    .headers(headers),
            )
            .map_err(|(err, _)| err)
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
    }
    rig.produce(100, 2, 1, 8);
    rig.archive_to_the_end("archiver", 1, &[]);

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let events: usize = archived_objects(&out, &rig.topic)
        .iter()
        .map(|object| object.lines.len())
        .sum();
    assert_eq!(
        events, 200,
        "every event around the hostile record is archived"
    );
    let letters: Vec<serde_json::Value> = files_under(&out)
        .iter()
        .filter(|(key, _)| key.starts_with("segment-logs/_dead-letter/"))
        .flat_map(|(_, path)| {
            let content = gunzip_single_member(path);
            content
                .split(|&b| b == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["reason"], "bad-header");
    assert_eq!(letter["offset"], 100);
    assert_eq!(
        letter["headers"],
        serde_json::json!([{"key_base64": "//5r", "value_base64": "dg=="}])
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.decode(letter["payload_base64"].as_str().unwrap())
            .unwrap(),
        payload
    );

    let stdout = rig.restore_todays_dead_letters("bad-header");
    assert_eq!(number_after(&stdout, "sent"), 1, "{stdout}");
    let stdout = rig.restore_todays_dead_letters("bad-header");
    assert_eq!(
        number_after(&stdout, "sent"),
        0,
        "a rerun sends nothing again: {stdout}"
    );
    let messages = rig.read_messages(&rig.topic, 1);
    let redriven: Vec<&TopicMessage> = messages[&0]
        .values()
        .filter(|message| message.payload == payload)
        .collect();
    assert_eq!(
        redriven.len(),
        2,
        "the original and the one restore sent back"
    );
    let back = redriven[1];
    assert_eq!(back.key.as_deref(), Some(b"k".as_slice()));
    assert_eq!(back.headers[0], (hostile_key.to_vec(), Some(b"v".to_vec())));
}

/// A producer that gives every record a source id and a day of its own opens a file per
/// record. The batch is sealed at `buffer.max_batch_files`, so what one batch opens, checkpoints
/// and uploads stays bounded: every event is still archived exactly once, the member stays
/// ready, and its memory stays small.
#[test]
fn a_flood_of_distinct_sources_and_days_is_cut_into_capped_batches() {
    const FLOOD: usize = 3_000;
    const CAP: usize = 250;
    let rig = Rig::start(1);
    rig.produce(100, 2, 1, 21);
    {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", rig.broker.bootstrap())
            .set("linger.ms", "20")
            .create()
            .unwrap();
        for i in 0..FLOOD {
            // Days of years 1 to 9999 are all valid received-days.
            let day = chrono::NaiveDate::from_ymd_opt(1 + (i as i32 * 37) % 9999, 1, 1).unwrap()
                + chrono::Days::new((i % 365) as u64);
            let payload = format!(
                r#"{{"projectId":"flood-{i:05}","messageId":"flood-{i}","receivedAt":"{day}T10:00:00.000Z"}}"#
            );
            loop {
                match producer.send(BaseRecord::<(), _>::to(&rig.topic).payload(&payload)) {
                    Ok(()) => break,
                    Err((_, _)) => {
                        producer.poll(Duration::from_millis(50));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    }
    rig.produce(100, 2, 1, 22);
    let records = rig.read_topic(1);
    assert_eq!(records[&0].len(), FLOOD + 200);

    let cap = CAP.to_string();
    // A 30 s schedule: the flood is read and cut in a few seconds, so its batches are sealed
    // by the file cap; the schedule seals the events after it.
    let settings = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "30"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_BUFFER_MAX_BATCH_FILES", cap.as_str()),
    ];
    let data = rig.dir.path().join("data-flood");
    let mut archiver = rig.archiver("archiver", &data, &settings);
    // Readiness, sampled while the flood is archived: once ready, it stays so.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, port) = (stop.clone(), archiver.metrics_port.unwrap());
        std::thread::spawn(move || {
            let (mut ready_once, mut unready) = (false, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = http_get(port, "/readyz");
                if status == 200 {
                    ready_once = true;
                } else if ready_once {
                    unready.push(body);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            unready
        })
    };
    rig.wait_committed(
        &end_offsets(&records),
        Duration::from_secs(240),
        &mut [&mut archiver],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let unready = sampler.join().unwrap();
    let peak_kb = peak_rss_kb(&archiver);
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());
    assert!(unready.is_empty(), "readiness went off: {unready:?}");

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    let objects = archived_objects(&out, &rig.topic);
    assert_exactly_once(&objects, &records, None);
    let batches: Vec<usize> = files_under(&out)
        .iter()
        .filter(|(key, _)| kafka_s3_archiver::layout::manifest_range(key).is_some())
        .map(|(_, path)| {
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            manifest["files"].as_array().expect("files").len()
        })
        .collect();
    assert!(
        batches.iter().all(|&files| files <= CAP),
        "a batch opened more than {CAP} files: {batches:?}"
    );
    assert!(batches.len() >= FLOOD / CAP, "{batches:?}");
    let (clean, report) = rig.verify(true);
    assert!(clean, "verify --deep: {report:#}");
    eprintln!(
        "{} objects in {} batches (at most {} files each), peak RSS {} MB",
        objects.len(),
        batches.len(),
        batches.iter().max().unwrap(),
        peak_kb / 1024
    );
    assert!(peak_kb < 200 * 1024, "peak RSS {peak_kb} kB");
}

/// Reads its peak resident memory (VmHWM) of a running process, in kB.
fn peak_rss_kb(process: &Process) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A producer decides how large events are: the records between the poll loop and the buffer
/// workers are bounded by bytes, not by a count that large events make gigabytes of.
#[test]
fn large_events_are_queued_by_bytes_not_by_count() {
    const EVENTS: usize = 160;
    const PAD: usize = 900_000;
    let rig = Rig::start(1);
    {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", rig.broker.bootstrap())
            .create()
            .unwrap();
        let mut rng = fastrand::Rng::with_seed(24);
        for i in 0..EVENTS {
            // Hardly compressible, as the worst producer would make it: deflate is slowest here.
            let pad: String = (0..PAD).map(|_| rng.alphanumeric()).collect();
            let payload = format!(
                r#"{{"projectId":"large","messageId":"large-{i}","receivedAt":"2026-11-20T10:00:00.000Z","pad":"{pad}"}}"#
            );
            loop {
                match producer.send(BaseRecord::<(), _>::to(&rig.topic).payload(&payload)) {
                    Ok(()) => break,
                    Err(_) => {
                        producer.poll(Duration::from_millis(50));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(120)).unwrap();
    }
    let records = rig.read_topic(1);
    assert_eq!(records[&0].len(), EVENTS);

    let settings = [
        ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
        ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ("ARCHIVER_BUFFER_WORKERS", "1"),
    ];
    let data = rig.dir.path().join("data-large");
    let mut archiver = rig.archiver("archiver", &data, &settings);
    rig.wait_committed(
        &end_offsets(&records),
        Duration::from_secs(240),
        &mut [&mut archiver],
    );
    let peak_kb = peak_rss_kb(&archiver);
    let status = archiver.terminate(Duration::from_secs(40));
    assert!(status.success(), "{}", archiver.log_text());

    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
    let total_mb = (EVENTS * PAD) >> 20;
    eprintln!(
        "{total_mb} MB of events archived with a peak RSS of {} MB",
        peak_kb >> 10
    );
    assert!(
        peak_kb < 250 << 10,
        "peak RSS {} MB for {total_mb} MB of 0.9 MB events",
        peak_kb >> 10
    );
}

/// A restore's run name is public (a dry run prints it, every message it sends carries it), and
/// anyone who can produce to the target topic can write a position header. A forged position
/// past the plan's end must not make the run count its lines as sent.
#[test]
fn a_forged_restore_position_cannot_make_a_restore_skip_lines() {
    let rig = Rig::start(1);
    rig.produce(200, 2, 1, 31);
    rig.archive_to_the_end("archiver", 1, &[]);
    let restore = [
        "restore",
        "--topic",
        rig.topic.as_str(),
        "--from",
        "2026-11-20",
        "--to",
        "2026-11-21",
    ];
    let dry = rig.command_ok(&[&restore[..], &["--dry-run"]].concat());
    let run = dry
        .split("dry run of restore ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no run name in: {dry}"))
        .to_string();
    {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", rig.broker.bootstrap())
            .create()
            .unwrap();
        let forged = format!("{run}:999999:0");
        let headers = OwnedHeaders::new().insert(Header {
            key: "kafka-s3-archiver-restore",
            value: Some(forged.as_bytes()),
        });
        producer
            .send(
                BaseRecord::<(), _>::to(&rig.topic)
                    .payload(r#"{"forged":true}"#)
                    .headers(headers),
            )
            .map_err(|(err, _)| err)
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
    }
    let stdout = rig.command_ok(&restore);
    assert_eq!(
        number_after(&stdout, "sent"),
        200,
        "the forged position made the restore skip lines: {stdout}"
    );
    let again = rig.command_ok(&restore);
    assert_eq!(
        number_after(&again, "sent"),
        0,
        "a rerun still finds what the run itself sent: {again}"
    );
}

fn check(rig: &Rig, extra: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(ARCHIVER);
    command
        .arg("check")
        .env_clear()
        .envs(rig.env(&rig.dir.path().join("unused")));
    for (key, value) in extra {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn start_up_mistakes_are_errors_that_name_their_cause() {
    let rig = Rig::start(1);
    let secret = "hunter2-do-not-print";
    let with_secret = [(
        "ARCHIVER_KAFKA_PROPERTIES",
        "{\"ssl.key.password\"=\"hunter2-do-not-print\"}",
    )];

    let (ok, out) = check(&rig, &with_secret);
    assert!(ok, "{out}");
    for line in [
        "ok   config",
        "ok   kafka:",
        "ok   topic: segment-events has 1 partition",
        "ok   group:",
        "ok   s3:",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    assert!(
        !out.contains(secret) && !out.contains("testing"),
        "a secret was printed:\n{out}"
    );

    let dead_port = format!("127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("ARCHIVER_KAFKA_BROKERS", &dead_port)],
            "FAIL kafka: no broker at 127.0.0.1:",
        ),
        (
            vec![("ARCHIVER_KAFKA_TOPIC", "no-such-topic")],
            "FAIL topic: no-such-topic does not exist",
        ),
        (
            vec![("ARCHIVER_S3_BUCKET", "no-such-bucket")],
            "NoSuchBucket: the bucket does not exist",
        ),
        (
            vec![
                ("ARCHIVER_KAFKA_NOPE", "1"),
                ("ARCHIVER_S3_CONCURRENCY", "many"),
                ("ARCHIVER_S3_BUCKET", "x"),
            ],
            "kafka.nope",
        ),
    ];
    for (extra, expected) in &cases {
        let (ok, out) = check(&rig, extra);
        assert!(!ok, "{extra:?} passed:\n{out}");
        assert!(
            out.contains(expected),
            "{extra:?}: {expected:?} missing:\n{out}"
        );
    }
    // All config problems at once.
    let (_, out) = check(&rig, &cases[3].0);
    assert!(
        out.contains("s3.concurrency") && out.contains("s3.bucket"),
        "{out}"
    );

    // A refusing bucket, through a proxy playing S3's part.
    for code in ["AccessDenied", "InvalidAccessKeyId"] {
        let proxy = FaultProxy::start(
            rig.s3.port,
            FaultRates {
                refuse_with: Some(code),
                ..FaultRates::default()
            },
            1,
        );
        let endpoint = proxy.endpoint();
        let (ok, out) = check(&rig, &[("ARCHIVER_S3_ENDPOINT_URL", &endpoint)]);
        assert!(
            !ok && out.contains("FAIL s3: cannot write") && out.contains(code),
            "{out}"
        );
    }

    // `run` refuses to start on the same mistakes, with the same words, before reading anything.
    rig.produce(100, 1, 1, 51);
    let mut archiver = rig.archiver(
        "bad-bucket",
        &rig.dir.path().join("data"),
        &[("ARCHIVER_S3_BUCKET", "no-such-bucket")],
    );
    let status = archiver.wait_exit(Duration::from_secs(60));
    let log = archiver.log_text();
    assert!(!status.success());
    assert!(
        log.contains("start-up checks failed") && log.contains("NoSuchBucket"),
        "{log}"
    );
    assert_eq!(rig.committed(1)[&0], None, "nothing may be committed");
}

#[test]
fn a_bucket_that_refuses_writes_loses_nothing_and_says_why() {
    let rig = Rig::start(1);
    let proxy = FaultProxy::start(rig.s3.port, FaultRates::default(), 2);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_S3_ENDPOINT_URL", &proxy.endpoint()),
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_S3_RETRY_MAX_BACKOFF_MS", "500"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !archiver.log_text().contains("partitions assigned") {
        assert!(Instant::now() < deadline, "{}", archiver.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The permissions change under the running archiver.
    proxy.set_rates(FaultRates {
        refuse_with: Some("AccessDenied"),
        ..FaultRates::default()
    });
    rig.produce(2_000, 2, 1, 61);
    let records = rig.read_topic(1);
    let ends = end_offsets(&records);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !archiver.log_text().contains("AccessDenied") {
        assert!(Instant::now() < deadline, "{}", archiver.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let log = archiver.log_text();
    assert!(
        log.contains("s3 refused the request; the batch stays on disk and its offsets uncommitted"),
        "{log}"
    );
    let (status, body) = archiver.http_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("s3 uploads are failing"), "{body}");
    let committed = rig.committed(1)[&0].unwrap_or(0);
    assert!(
        committed < ends[&0],
        "committed {committed} while every upload was refused"
    );
    let buffered = archiver.scrape()["archiver_buffered_bytes"];
    assert!(buffered > 0.0, "the refused batch must stay on disk");

    // Fixed: everything goes up, exactly once.
    proxy.set_rates(FaultRates::default());
    rig.wait_committed(&ends, Duration::from_secs(60), &mut [&mut archiver]);
    assert!(archiver.terminate(Duration::from_secs(40)).success());
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
}

/// The operator's object options reach S3: SSE, storage class, canned ACL, Content-MD5 instead
/// of the SDK's checksum trailers, and the `application/gzip` label.
#[test]
fn object_options_reach_s3() {
    let rig = Rig::start(1);
    rig.produce(1_000, 2, 1, 71);
    let records = rig.read_topic(1);
    let ends = end_offsets(&records);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "2"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ("ARCHIVER_S3_SERVER_SIDE_ENCRYPTION", "AES256"),
            ("ARCHIVER_S3_STORAGE_CLASS", "STANDARD_IA"),
            ("ARCHIVER_S3_ACL", "bucket-owner-full-control"),
            ("ARCHIVER_S3_CHECKSUM", "content-md5"),
            ("ARCHIVER_S3_CONTENT_LABEL", "gzip"),
        ],
    );
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut archiver]);
    assert!(archiver.terminate(Duration::from_secs(40)).success());

    let keys: Vec<String> = rig
        .s3
        .keys()
        .into_iter()
        .filter(|k| k.ends_with(".gz"))
        .collect();
    assert!(!keys.is_empty());
    for key in keys.iter().take(3) {
        let head = rig.s3.head(key);
        assert_eq!(head["ServerSideEncryption"], "AES256", "{head}");
        assert_eq!(head["StorageClass"], "STANDARD_IA", "{head}");
        assert_eq!(head["ContentType"], "application/gzip", "{head}");
        assert!(head.get("ContentEncoding").is_none(), "{head}");
    }
    let out = rig.dir.path().join("bucket");
    rig.s3.download(&out);
    assert_exactly_once(&archived_objects(&out, &rig.topic), &records, None);
}
