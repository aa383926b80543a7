//! `restore` against real servers (tansu, moto): archived events go back into a topic exactly
//! once, through `kill -9`s and reruns, and archive again to the same lines; dead letters go back
//! as the records they were.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use support::s3_proxy::{FaultProxy, FaultRates};
use support::*;

const FROM: &str = "2026-11-20";
const TO: &str = "2026-11-21";

fn epoch_ms_folder(day: &str) -> String {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
    (date.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() * 1000).to_string()
}

/// `kafka-s3-archiver restore` of `sources` on the test's days, with `args` after the selection.
fn restore_command(rig: &Rig, target: &str, sources: &[String], args: &[&str]) -> Command {
    let mut command = rig.command(&["restore", "--topic", target, "--from", FROM, "--to", TO]);
    command
        .args(sources.iter().flat_map(|s| ["--source", s]))
        .args(args);
    command
}

/// Runs a restore to its end; its standard output.
fn restore_to_end(rig: &Rig, target: &str, sources: &[String], args: &[&str]) -> String {
    let mut all = vec!["restore", "--topic", target, "--from", FROM, "--to", TO];
    all.extend(sources.iter().flat_map(|s| ["--source", s.as_str()]));
    all.extend_from_slice(args);
    rig.command_ok(&all)
}
/// One partition of `count` events of `sources` sources archived, and the empty topic `target`
/// of two partitions: the rig, and how many lines a restore of every source sends.
fn archived_and_a_target(count: u64, sources: usize, seed: u64, target: &str) -> (Rig, u64) {
    let rig = Rig::start(1);
    let selected = archive_and_create(&rig, count, sources, seed, target);
    (rig, selected)
}

/// [`archived_and_a_target`] on a rig of one partition already started: how many lines a
/// restore of every source sends.
fn archive_and_create(rig: &Rig, count: u64, sources: usize, seed: u64, target: &str) -> u64 {
    rig.produce(count, sources, 1, seed);
    rig.archive_to_the_end("archiver", 1, &[]);
    rig.broker.create_topic(target, 2);
    let dry = restore_to_end(rig, target, &[], &["--dry-run"]);
    number_after(&dry, "would send")
}

/// A restore of every source at 700 lines a second whose producer gives up on the broker after
/// 2 s without an acknowledgement (`message.timeout.ms`), so an outage of a few seconds stops it.
fn restore_with_a_short_delivery_timeout(rig: &Rig, target: &str) -> Command {
    let mut command = restore_command(rig, target, &[], &["--rate", "700"]);
    command.env(
        "ARCHIVER_KAFKA_PROPERTIES",
        r#"{"message.timeout.ms"="2000"}"#,
    );
    command
}

/// Takes the mock cluster's three brokers down for `outage`, then brings them back.
fn every_broker_down_for(rig: &Rig, outage: Duration) {
    for broker in 1..=3 {
        rig.broker.control(&format!("down {broker}"));
    }
    std::thread::sleep(outage);
    for broker in 1..=3 {
        rig.broker.control(&format!("up {broker}"));
    }
}

/// Others producing to a restore's target: small events keyed by seven users, one every
/// `pause`, from a thread of their own until `stop`.
struct LiveTraffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl LiveTraffic {
    fn start(rig: &Rig, target: &'static str, pause: Duration) -> LiveTraffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stopped, bootstrap) = (std::sync::Arc::clone(&stop), rig.broker.bootstrap());
        let thread = std::thread::spawn(move || {
            let producer: rdkafka::producer::BaseProducer = rdkafka::config::ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .create()
                .unwrap();
            let mut sent = 0u64;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let payload = format!(r#"{{"type":"track","messageId":"live-{sent}"}}"#);
                let key = format!("user-{}", sent % 7);
                let record = rdkafka::producer::BaseRecord::to(target)
                    .key(&key)
                    .payload(&payload);
                if producer.send(record).is_ok() {
                    sent += 1;
                }
                producer.poll(pause);
            }
            rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
            sent
        });
        LiveTraffic { stop, thread }
    }

    /// Stops the traffic: how many events it sent.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Each of the `selected` lines is in `target` once (its messages that `restored` picks).
fn each_line_once(
    rig: &Rig,
    target: &str,
    selected: u64,
    restored: impl Fn(&TopicMessage) -> bool,
) {
    let messages = rig.read_messages(target, 2);
    let mut copies: HashMap<Vec<u8>, usize> = HashMap::new();
    for message in messages.values().flat_map(BTreeMap::values) {
        if restored(message) {
            *copies.entry(message.payload.clone()).or_default() += 1;
        }
    }
    assert_eq!(copies.len() as u64, selected);
    assert!(copies.values().all(|&n| n == 1), "lines restored twice");
}

#[test]
fn a_restore_killed_again_and_again_sends_its_selection_exactly_once_and_archives_back_to_it() {
    let rig = Rig::start(4);
    rig.produce(50_000, 5, 3, 11);
    rig.archive_to_the_end("archiver", 4, &[]);

    // What the selection holds: the lines of two sources on two of the three days.
    let bucket = rig.dir.path().join("bucket");
    rig.s3.download(&bucket);
    let days = [epoch_ms_folder(FROM), epoch_ms_folder(TO)];
    let objects = archived_objects(&bucket, &rig.topic);
    let all_sources: std::collections::BTreeSet<&str> =
        objects.iter().map(|o| o.source.as_str()).collect();
    assert_eq!(all_sources.len(), 5, "{all_sources:?}");
    // Two of the five sources: the first and the third.
    let sources: Vec<String> = all_sources
        .iter()
        .step_by(2)
        .take(2)
        .map(|s| s.to_string())
        .collect();
    let mut expected: BTreeMap<(String, String), HashMap<Vec<u8>, usize>> = BTreeMap::new();
    let mut selected = 0usize;
    for object in objects {
        if sources.contains(&object.source) && days.contains(&object.day) {
            let lines = expected.entry((object.source, object.day)).or_default();
            for line in object.lines {
                *lines.entry(line).or_default() += 1;
                selected += 1;
            }
        }
    }
    assert!(selected > 10_000, "only {selected} lines selected");
    assert_eq!(expected.len(), 4);

    let target = "restored";
    rig.broker.create_topic(target, 3);

    // A dry run counts what a run sends, and sends nothing.
    let dry = restore_to_end(&rig, target, &sources, &["--dry-run"]);
    assert_eq!(number_after(&dry, "would send"), selected as u64, "{dry}");
    assert!(rig.read_messages(target, 3).values().all(|m| m.is_empty()));

    // Killed at random points, then run to its end.
    let mut rng = fastrand::Rng::with_seed(5);
    let mut kills = 0;
    for attempt in 0..6 {
        let log = rig.dir.path().join(format!("restore-{attempt}.log"));
        let mut command = restore_command(&rig, target, &sources, &["--rate", "2000"]);
        command.stdout(std::process::Stdio::null());
        let mut process = Process::spawn(command, log);
        std::thread::sleep(Duration::from_millis(rng.u64(1000..5000)));
        if process.child.try_wait().unwrap().is_none() {
            process.kill9();
            kills += 1;
        }
    }
    assert!(kills >= 5, "the restore ended before it could be killed");
    let last = restore_to_end(&rig, target, &sources, &[]);
    let sent_last = number_after(&last, "sent");
    let sent_before = number_after(&last, "MB/s;");
    assert!(sent_before > 0, "the killed runs sent nothing: {last}");
    assert_eq!(sent_last + sent_before, selected as u64, "{last}");
    let again = restore_to_end(&rig, target, &sources, &[]);
    assert_eq!(number_after(&again, "sent"), 0, "{again}");
    // Keys pick the partitions: the same restore with other key fields is refused, not run.
    let other_keys = restore_command(&rig, target, &sources, &["--key-field", "messageId"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other_keys.stderr);
    assert!(
        !other_keys.status.success() && stderr.contains("--key-field"),
        "a rerun with other key fields went ahead: {stderr}\n{}",
        String::from_utf8_lossy(&other_keys.stdout)
    );

    // The target holds each selected line once, with its source header, keyed by the user.
    let messages = rig.read_messages(target, 3);
    let mut restored: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    for message in messages.values().flat_map(BTreeMap::values) {
        let source = String::from_utf8(message.header("source-id").unwrap().to_vec()).unwrap();
        assert!(message.key.is_some(), "an event without a key");
        *restored
            .entry((source, message.payload.clone()))
            .or_default() += 1;
    }
    let duplicated = restored.values().filter(|&&n| n > 1).count();
    assert_eq!(duplicated, 0, "lines restored more than once");
    assert_eq!(restored.len(), selected);

    // Archived again under another prefix, the restored topic gives back the same lines under
    // the same sources and days.
    let ends: BTreeMap<i32, i64> = messages
        .iter()
        .map(|(&p, m)| (p, m.keys().next_back().map_or(0, |o| o + 1)))
        .collect();
    let mut again = rig.archiver(
        "archiver-again",
        &rig.dir.path().join("data-again"),
        &[
            ("ARCHIVER_KAFKA_TOPIC", target),
            ("ARCHIVER_KAFKA_GROUP_ID", "archiver-again"),
            ("ARCHIVER_S3_PREFIX", "again/"),
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    rig.wait_committed_on(
        target,
        "archiver-again",
        &ends,
        Duration::from_secs(180),
        &mut [&mut again],
    );
    assert!(again.terminate(Duration::from_secs(40)).success());
    let second = rig.dir.path().join("again");
    rig.s3.download_prefix("again/", &second);
    let mut archived: BTreeMap<(String, String), HashMap<Vec<u8>, usize>> = BTreeMap::new();
    for object in archived_objects(&second, target) {
        let lines = archived.entry((object.source, object.day)).or_default();
        for line in object.lines {
            *lines.entry(line).or_default() += 1;
        }
    }
    assert!(
        archived == expected,
        "the second archive differs from the selection"
    );
}

#[test]
fn dead_letters_go_back_as_the_records_they_were() {
    let rig = Rig::start(1);
    // Events whose source no rule finds: dead letters under the default rules.
    let produce = |payload: &str| {
        let mut config = rdkafka::config::ClientConfig::new();
        config.set("bootstrap.servers", rig.broker.bootstrap());
        let producer: rdkafka::producer::BaseProducer = config.create().unwrap();
        producer
            .send(
                rdkafka::producer::BaseRecord::to(&rig.topic)
                    .key("user-9")
                    .payload(payload),
            )
            .unwrap();
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    };
    for n in 0..3 {
        produce(&format!(
            r#"{{"type":"track","event":"e{n}","messageId":"m{n}","receivedAt":"2026-11-20T10:00:00Z"}}"#
        ));
    }
    rig.produce(200, 2, 1, 3);
    rig.archive_to_the_end("archiver", 1, &[]);

    // Sent back to the topic they came from, they are archived by an archiver whose rules now
    // find their source: each once, under that source.
    let stdout = rig.restore_todays_dead_letters("no-source");
    assert_eq!(number_after(&stdout, "sent"), 3, "{stdout}");

    rig.archive_to_the_end(
        "archiver-fixed",
        1,
        &[(
            "ARCHIVER_ROUTING_SOURCE",
            r#"["header:source-id","field:projectId","static:recovered"]"#,
        )],
    );
    let bucket = rig.dir.path().join("bucket");
    rig.s3.download(&bucket);
    let recovered: Vec<Vec<u8>> = archived_objects(&bucket, &rig.topic)
        .into_iter()
        .filter(|o| o.source == "recovered")
        .flat_map(|o| o.lines)
        .collect();
    let mut messages: Vec<String> = recovered
        .iter()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_slice(line).unwrap();
            event["messageId"].as_str().unwrap().to_string()
        })
        .collect();
    messages.sort();
    assert_eq!(messages, ["m0", "m1", "m2"]);
}

#[test]
fn bad_input_stops_a_restore_with_its_cause_or_is_skipped_and_counted() {
    let rig = Rig::start(1);
    rig.produce(300, 2, 1, 4);
    rig.archive_to_the_end("archiver", 1, &[]);
    let run = |args: &[&str]| {
        let output = rig
            .command(&["restore", "--to", FROM])
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };

    let (ok, text) = run(&["--topic", "no-such-topic", "--from", FROM]);
    assert!(
        !ok && text.contains("target topic no-such-topic does not exist"),
        "{text}"
    );
    let (ok, text) = run(&["--topic", "t2", "--from", "2026-13-01"]);
    assert!(!ok && text.contains("--from \"2026-13-01\""), "{text}");
    let (ok, text) = run(&[
        "--topic",
        &rig.topic,
        "--from",
        FROM,
        "--reason",
        "no-source",
    ]);
    assert!(!ok && text.contains("add --dead-letter"), "{text}");

    // An archived object whose bytes went bad: named, nothing sent; skipped and counted on
    // request, the other source's object sent whole.
    rig.broker.create_topic("target", 2);
    let keys = rig.s3.keys();
    let corrupt = keys
        .iter()
        .find(|k| k.ends_with(".gz") && !k.contains("/_"))
        .unwrap()
        .clone();
    let lost: usize = rig.s3.head(&corrupt)["Metadata"]["record-count"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .expect("the object's record count");
    assert!(lost < 300, "one object holds every event");
    let local = rig.dir.path().join("corrupt.gz");
    std::fs::write(&local, b"\x1f\x8b\x08\x00 this is not gzip").unwrap();
    rig.s3.aws(&[
        "s3",
        "cp",
        local.to_str().unwrap(),
        &format!("s3://{BUCKET}/{corrupt}"),
    ]);
    let (ok, text) = run(&["--topic", "target", "--from", FROM, "--dry-run"]);
    assert!(
        !ok && text.contains(&corrupt) && text.contains("--skip-corrupt"),
        "{text}"
    );
    let (ok, text) = run(&["--topic", "target", "--from", FROM, "--skip-corrupt"]);
    assert!(ok, "{text}");
    assert_eq!(number_after(&text, ": sent"), 300 - lost as u64, "{text}");
    assert_eq!(number_after(&text, "skipped as corrupt:"), 1, "{text}");
    let sent: usize = rig
        .read_messages("target", 2)
        .values()
        .map(BTreeMap::len)
        .sum();
    assert_eq!(sent, 300 - lost);
}

/// A restore into a topic others keep producing to (the README's dead-letter re-drive goes to
/// the live topic) starts at once, and a rerun finds where the first one stood in bounded time,
/// although the topic never goes quiet.
#[test]
fn a_restore_into_a_topic_with_traffic_starts_and_resumes() {
    let target = "live";
    let (rig, selected) = archived_and_a_target(3_000, 2, 23, target);
    assert!(selected >= 2_500, "only {selected} lines selected");

    // Events into the target as fast as one producer sends them, until the test ends.
    let traffic = LiveTraffic::start(&rig, target, Duration::from_millis(3));
    std::thread::sleep(Duration::from_secs(3));

    let run = |name: &str| {
        let mut process = Process::spawn(
            restore_command(&rig, target, &[], &[]),
            rig.dir.path().join(format!("{name}.log")),
        );
        let status = process.wait_exit(Duration::from_secs(90));
        let log = process.log_text();
        assert!(status.success(), "{name}: {log}");
        log
    };
    let first = run("restore-live");
    // The log holds the summary line after the log lines (`events_sent=…`).
    assert_eq!(number_after(&first, ": sent"), selected, "{first}");
    let rerun = run("restore-live-again");
    assert_eq!(number_after(&rerun, ": sent"), 0, "{rerun}");

    let live = traffic.stop();
    assert!(live > 1_000, "the traffic sent only {live} events");
    each_line_once(&rig, target, selected, |message| {
        message.header("kafka-s3-archiver-restore").is_some()
    });
}

/// Downloads that break mid-body (a connection reset; a body fetched ahead can sit idle a long
/// while) are fetched again and go on after the lines already handled: nothing is skipped as
/// corrupt, even with `--skip-corrupt`, and each line reaches the target once.
#[test]
fn downloads_that_break_mid_body_are_fetched_again_not_skipped_as_corrupt() {
    let target = "restored";
    let (rig, selected) = archived_and_a_target(20_000, 3, 29, target);

    // The first download of every object breaks halfway.
    let proxy = FaultProxy::start(
        rig.s3.port,
        FaultRates {
            cut_first_get: Some(".gz"),
            ..FaultRates::default()
        },
        3,
    );
    let mut command = restore_command(&rig, target, &[], &["--skip-corrupt"]);
    command.env("ARCHIVER_S3_ENDPOINT_URL", proxy.endpoint());
    let output = command.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let cut = proxy.counts.cut.lock().unwrap().len();
    assert!(cut >= 3, "only {cut} downloads were cut");
    assert!(!stdout.contains("skipped as corrupt"), "{stdout}");
    assert_eq!(number_after(&stdout, "sent"), selected, "{stdout}");

    each_line_once(&rig, target, selected, |_| true);
}

/// An object of the selection that no batch manifest lists (an interrupted upload's earlier
/// attempt cut elsewhere, a copy made by hand) holds lines the listed objects already hold: the
/// restore leaves it out and names it, and sends each line once.
#[test]
fn an_object_no_manifest_lists_is_left_out_and_named() {
    let target = "restored";
    let (rig, selected) = archived_and_a_target(2_000, 2, 31, target);

    // A copy of an archived object under the key an attempt starting one offset later would use.
    let keys = rig.s3.keys();
    let original = keys
        .iter()
        .find(|k| k.ends_with(".gz") && !k.contains("/_"))
        .expect("an archived object");
    let (stem, offset) = original
        .strip_suffix(".gz")
        .and_then(|k| k.rsplit_once('-'))
        .unwrap();
    let stray = format!("{stem}-{:020}.gz", offset.parse::<i64>().unwrap() + 1);
    let copied = rig.s3.aws(&[
        "s3",
        "cp",
        &format!("s3://{BUCKET}/{original}"),
        &format!("s3://{BUCKET}/{stray}"),
    ]);
    assert!(copied.status.success(), "{copied:?}");

    let mut command = restore_command(&rig, target, &[], &[]);
    let output = command.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(number_after(&stdout, ": sent"), selected, "{stdout}");
    assert!(stdout.contains("left out: 1 objects"), "{stdout}");
    assert!(
        stderr.contains(&stray),
        "the log does not name {stray}: {stderr}"
    );

    each_line_once(&rig, target, selected, |_| true);
}

/// The target's brokers go down for longer than the producer's delivery timeout
/// (`message.timeout.ms`) and come back mid-run. librdkafka's idempotent producer drops the
/// messages that time out in its queue and carries on with the later ones, so a partition would
/// hold its lines with a hole in them, and a rerun, which goes on after the last line of each
/// partition, would never send the lines of the hole. The run stops instead, leaving each
/// partition a prefix of its lines, and says why; the rerun sends the rest.
#[test]
fn brokers_down_past_the_delivery_timeout_leave_no_hole_a_rerun_skips() {
    let target = "restored";
    let rig = Rig::start_mock(1);
    // The mock cluster keeps a few thousand messages of each partition.
    let selected = archive_and_create(&rig, 5_000, 2, 37, target);
    assert!(selected >= 4_000, "only {selected} lines selected");

    // About seven seconds of sending, with the outage from the second to the sixth.
    let command = restore_with_a_short_delivery_timeout(&rig, target);
    let mut first = Process::spawn(command, rig.dir.path().join("restore-outage.log"));
    std::thread::sleep(Duration::from_millis(1500));
    every_broker_down_for(&rig, Duration::from_secs(4));
    let status = first.wait_exit(Duration::from_secs(120));
    let rerun = restore_to_end(&rig, target, &[], &[]);
    each_line_once(&rig, target, selected, |_| true);

    let log = first.log_text();
    assert!(!status.success(), "the run went through the outage: {log}");
    assert!(
        log.contains("acknowledged none") && log.contains("message.timeout.ms"),
        "the run does not say why it stopped: {log}"
    );
    assert!(
        number_after(&rerun, ": sent") > 0,
        "the rerun had nothing left to send: {rerun}"
    );
}

/// A restore small enough that each target partition gets its lines in one record batch, run
/// again: tansu reports such a partition's end as just past the start of that batch (high
/// watermark 1 with 150 messages), and the rerun must still find the run's last messages there
/// rather than send them again.
#[test]
fn a_rerun_of_a_restore_of_one_batch_per_partition_sends_nothing_again() {
    let target = "restored";
    let (rig, selected) = archived_and_a_target(300, 2, 41, target);
    assert!(selected >= 200, "only {selected} lines selected");
    let first = restore_to_end(&rig, target, &[], &[]);
    assert_eq!(number_after(&first, ": sent"), selected, "{first}");
    let rerun = restore_to_end(&rig, target, &[], &[]);
    assert_eq!(number_after(&rerun, ": sent"), 0, "{rerun}");
    each_line_once(&rig, target, selected, |_| true);
}

/// Retention (or compaction) removes the run's messages from a target partition after the run:
/// the rerun finds none of them there, and must not send that partition's lines again (its
/// consumers had them before retention took them). The mock cluster keeps 5 MB of each
/// partition: 6 MB more written to partition 0 pushes the run's messages out.
#[test]
fn a_rerun_after_retention_removed_the_runs_messages_sends_nothing_again() {
    let target = "restored";
    let rig = Rig::start_mock(1);
    let selected = archive_and_create(&rig, 2_000, 2, 43, target);
    let first = restore_to_end(&rig, target, &[], &[]);
    assert_eq!(number_after(&first, ": sent"), selected, "{first}");

    let producer: rdkafka::producer::BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", rig.broker.bootstrap())
        .create()
        .unwrap();
    let filler = vec![b'x'; 1024];
    for _ in 0..6 * 1024 {
        let record = rdkafka::producer::BaseRecord::<(), _>::to(target)
            .partition(0)
            .payload(&filler);
        producer.send(record).map_err(|(err, _)| err).unwrap();
        producer.poll(Duration::ZERO);
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    let kept = rig.read_messages(target, 2);
    assert!(
        kept[&0].values().all(|m| m.payload == filler),
        "retention left messages of the run in partition 0"
    );

    let rerun = restore_to_end(&rig, target, &[], &[]);
    assert_eq!(number_after(&rerun, ": sent"), 0, "{rerun}");
}

/// Everything a long restore into a busy cluster meets, at once: a live target others produce
/// to throughout, S3 resetting connections, failing requests and cutting the first download of
/// each object halfway, every broker down for longer than the delivery timeout, and `kill -9`s,
/// in a seeded order, each fault on a run of its own; then the same restore run to its end.
/// Every selected line is in the target exactly once.
#[test]
fn a_restore_through_outages_resets_a_live_target_and_kills_sends_each_line_once() {
    let target = "restored";
    let rig = Rig::start_mock(1);
    let selected = archive_and_create(&rig, 5_000, 3, 47, target);
    assert!(selected >= 4_000, "only {selected} lines selected");
    let proxy = FaultProxy::start(
        rig.s3.port,
        FaultRates {
            reset: 0.05,
            internal_error: 0.05,
            cut_first_get: Some(".gz"),
            ..FaultRates::default()
        },
        47,
    );

    // About 200 events a second into the target, until the test ends (under the mock cluster's
    // 5 MB per partition, which would otherwise take restored lines away).
    let traffic = LiveTraffic::start(&rig, target, Duration::from_millis(5));

    let restore = |name: &str| {
        let mut command = restore_with_a_short_delivery_timeout(&rig, target);
        command
            .env("ARCHIVER_S3_ENDPOINT_URL", proxy.endpoint())
            .stdout(std::process::Stdio::null());
        Process::spawn(command, rig.dir.path().join(format!("{name}.log")))
    };
    let mut rng = fastrand::Rng::with_seed(47);
    let (mut kills, mut outages) = (0, 0);
    for attempt in 0..6 {
        let mut run = restore(&format!("restore-{attempt}"));
        std::thread::sleep(Duration::from_millis(rng.u64(1_000..3_000)));
        if run.child.try_wait().unwrap().is_some() {
            continue;
        }
        if attempt % 2 == 0 {
            run.kill9();
            kills += 1;
        } else {
            every_broker_down_for(&rig, Duration::from_secs(4));
            outages += 1;
            run.wait_exit(Duration::from_secs(120));
        }
    }
    assert!(
        kills >= 2 && outages >= 2,
        "{kills} kills, {outages} outages"
    );

    let mut last = restore("restore-last");
    let status = last.wait_exit(Duration::from_secs(180));
    let log = last.log_text();
    assert!(status.success(), "{log}");
    let live = traffic.stop();
    assert!(live > 1_000, "the traffic sent only {live} events");
    assert!(proxy.counts.faults() > 0, "S3 never failed");
    assert!(
        !proxy.counts.cut.lock().unwrap().is_empty(),
        "no download was cut"
    );
    each_line_once(&rig, target, selected, |message| {
        message.header("kafka-s3-archiver-restore").is_some()
    });
}
