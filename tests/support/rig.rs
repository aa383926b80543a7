//! The rig: a broker, an S3 server and the archivers of one test, with what they hold.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::*;

/// The brokers and store a test runs against, and its scratch directory.
/// How a test says the broker process itself died under it (see `Broker::is_gone`).
pub const BROKER_GONE: &str = "the broker process is gone";

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub broker: Broker,
    pub s3: S3Server,
    pub topic: String,
}

impl Rig {
    /// tansu and moto.
    pub fn start(partitions: u32) -> Rig {
        Rig::start_with(partitions, Broker::start_tansu)
    }

    /// librdkafka's mock cluster and moto.
    pub fn start_mock(partitions: u32) -> Rig {
        Rig::start_with(partitions, Broker::start_mock)
    }

    fn start_with(partitions: u32, broker: fn(&Path, &str, u32) -> Broker) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("archiver-e2e-")
            .tempdir()
            .expect("temp dir");
        let topic = "segment-events".to_string();
        let broker = broker(dir.path(), &topic, partitions);
        let s3 = S3Server::start(dir.path());
        Rig {
            dir,
            broker,
            s3,
            topic,
        }
    }

    /// Environment that points the archiver at this rig.
    pub fn env(&self, data_dir: &Path) -> Vec<(String, String)> {
        [
            ("ARCHIVER_KAFKA_BROKERS", self.broker.bootstrap()),
            ("ARCHIVER_KAFKA_TOPIC", self.topic.clone()),
            ("ARCHIVER_KAFKA_GROUP_ID", "archiver-test".into()),
            ("ARCHIVER_KAFKA_SESSION_TIMEOUT_MS", "6000".into()),
            (
                "ARCHIVER_KAFKA_EXACTLY_ONCE",
                if self.broker.keeps_commit_metadata {
                    "required"
                } else {
                    "best-effort"
                }
                .into(),
            ),
            ("ARCHIVER_S3_BUCKET", BUCKET.into()),
            ("ARCHIVER_S3_ENDPOINT_URL", self.s3.endpoint()),
            ("ARCHIVER_S3_FORCE_PATH_STYLE", "true".into()),
            ("ARCHIVER_S3_RETRY_MAX_BACKOFF_MS", "2000".into()),
            ("ARCHIVER_BUFFER_DATA_DIR", data_dir.display().to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            (
                "RUST_LOG",
                // For debugging a test: E2E_LOG=info,librdkafka=debug
                std::env::var("E2E_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts `kafka-s3-archiver run` with this rig's environment plus `extra`.
    pub fn archiver(&self, name: &str, data_dir: &Path, extra: &[(&str, &str)]) -> Process {
        let mut command = Command::new(ARCHIVER);
        command.arg("run").env_clear().envs(self.env(data_dir));
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        // For debugging a test: E2E_KAFKA_DEBUG=cgrp,fetch
        if let Ok(debug) = std::env::var("E2E_KAFKA_DEBUG") {
            command.env(
                "ARCHIVER_KAFKA_PROPERTIES",
                format!("{{debug=\"{debug}\"}}"),
            );
        }
        let metrics_port = free_port();
        command.env(
            "ARCHIVER_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        );
        let mut process = Process::spawn(command, self.dir.path().join(format!("{name}.log")));
        process.metrics_port = Some(metrics_port);
        process
    }

    /// A one-shot `kafka-s3-archiver` command (`restore`, `verify`, …) with this rig's settings.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(ARCHIVER);
        command
            .args(args)
            .env_clear()
            .envs(self.env(&self.dir.path().join("unused")));
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        command
    }

    /// Runs a one-shot command to its end and returns its standard output; fails the test if
    /// the command fails.
    pub fn command_ok(&self, args: &[&str]) -> String {
        let output = self.command(args).output().expect("run the archiver");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Runs `restore --dead-letter --reason {reason}` into this rig's topic for the dead letters
    /// filed today (they are filed under the day Kafka received them), and returns its stdout.
    pub fn restore_todays_dead_letters(&self, reason: &str) -> String {
        let today = chrono::Utc::now().date_naive();
        let from = today.pred_opt().unwrap().to_string();
        let to = today.succ_opt().unwrap().to_string();
        self.command_ok(&[
            "restore",
            "--dead-letter",
            "--reason",
            reason,
            "--topic",
            &self.topic,
            "--from",
            &from,
            "--to",
            &to,
        ])
    }

    /// Runs `kafka-s3-archiver verify --json [--deep]` against this rig.
    pub fn verify(&self, deep: bool) -> (bool, serde_json::Value) {
        let mut command = self.command(&["verify", "--json"]);
        if deep {
            command.arg("--deep");
        }
        let output = command.output().expect("run verify");
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "verify printed no JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.success(), report)
    }

    /// Starts an archiver that is to take over a partition from one killed with `kill -9`.
    ///
    /// tansu 0.6 sometimes answers a follower's SyncGroup with an empty assignment while the
    /// killed member, the group leader, is still registered, and then never rebalances (seen
    /// with librdkafka's cgrp debug log). A real Kafka coordinator evicts the dead leader after
    /// the session timeout. Here a member left without partitions is restarted, as a pod whose
    /// readiness probe fails would be.
    pub fn archiver_after_kill(
        &self,
        name: &str,
        data_dir: &Path,
        extra: &[(&str, &str)],
    ) -> Process {
        for attempt in 1..=4 {
            let mut process = self.archiver(&format!("{name}-{attempt}"), data_dir, extra);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if process.log_text().contains("partitions assigned") {
                    return process;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("{name}: no partitions after 20s (tansu group bug), restarting");
            process.terminate(Duration::from_secs(30));
        }
        panic!("{name} never got partitions");
    }

    /// Starts `kafka-s3-archiver produce` in the background at `rate` events per second, for
    /// `sources` sources over `days` received-days.
    pub fn produce_in_background(
        &self,
        count: u64,
        rate: u64,
        sources: usize,
        days: u32,
        seed: u64,
    ) -> Process {
        let mut command = Command::new(ARCHIVER);
        command
            .args([
                "produce",
                "--count",
                &count.to_string(),
                "--rate",
                &rate.to_string(),
            ])
            .args([
                "--sources",
                &sources.to_string(),
                "--days",
                &days.to_string(),
                "--start-day",
                "2026-11-20",
            ])
            .args([
                "--near-midnight",
                "0.1",
                "--seed",
                &seed.to_string(),
                "--minimal",
            ])
            .env("ARCHIVER_KAFKA_BROKERS", self.broker.bootstrap())
            .env("ARCHIVER_KAFKA_TOPIC", &self.topic);
        Process::spawn(command, self.dir.path().join("producer.log"))
    }

    /// Runs `kafka-s3-archiver produce`.
    pub fn produce(&self, count: u64, sources: usize, days: u32, seed: u64) {
        self.produce_compressed(count, sources, days, seed, "none");
    }

    /// Runs `kafka-s3-archiver produce` with the producer compressing its batches with `codec`.
    pub fn produce_compressed(
        &self,
        count: u64,
        sources: usize,
        days: u32,
        seed: u64,
        codec: &str,
    ) {
        run_ok(
            Command::new(ARCHIVER)
                .args(["produce", "--count", &count.to_string()])
                .args([
                    "--sources",
                    &sources.to_string(),
                    "--days",
                    &days.to_string(),
                ])
                .args(["--start-day", "2026-11-20", "--near-midnight", "0.2"])
                .args(["--seed", &seed.to_string()])
                .args(if codec == "none" {
                    vec![]
                } else {
                    vec!["--compression", codec]
                })
                .env("ARCHIVER_KAFKA_BROKERS", self.broker.bootstrap())
                .env("ARCHIVER_KAFKA_TOPIC", &self.topic),
        );
    }

    /// Runs `kafka-s3-archiver produce` for `count` minimal events padded to `pad_bytes`, all to
    /// `partition`, at `rate` a second: fills one partition of a small log fast.
    pub fn produce_burst(
        &self,
        partition: i32,
        count: u64,
        pad_bytes: usize,
        rate: u64,
        seed: u64,
    ) {
        run_ok(
            Command::new(ARCHIVER)
                .args(["produce", "--count", &count.to_string()])
                .args(["--rate", &rate.to_string(), "--minimal"])
                .args(["--pad-bytes", &pad_bytes.to_string()])
                .args(["--partition", &partition.to_string()])
                .args(["--sources", "4", "--days", "2", "--start-day", "2026-11-20"])
                .args(["--seed", &seed.to_string()])
                .env("ARCHIVER_KAFKA_BROKERS", self.broker.bootstrap())
                .env("ARCHIVER_KAFKA_TOPIC", &self.topic),
        );
    }

    /// Follows the topic from its start until [`TopicTail::finish`]: a record is read as soon as
    /// it is produced, before retention can delete it, so a test knows every record there was.
    pub fn tail_topic(&self, partitions: u32) -> TopicTail {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", "archiver-test-tail")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("tail reader");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut records = TopicRecords::new();
            let mut quiet_since = Instant::now();
            loop {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                    let payload = message.payload().unwrap_or_default().to_vec();
                    records
                        .entry(message.partition())
                        .or_default()
                        .insert(message.offset(), payload);
                    quiet_since = Instant::now();
                }
                let stopping = stopping.load(std::sync::atomic::Ordering::Relaxed);
                if stopping && quiet_since.elapsed() > Duration::from_secs(2) {
                    return records;
                }
            }
        });
        TopicTail {
            stop,
            thread: Some(thread),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.broker.bootstrap())
            .set("group.id", "archiver-test")
            .set("enable.auto.commit", "false");
        config
    }

    /// Every record of the topic: partition → offset → payload, read from the beginning until
    /// the topic has been quiet for two seconds.
    pub fn read_topic(&self, partitions: u32) -> BTreeMap<i32, BTreeMap<i64, Vec<u8>>> {
        self.read_messages(&self.topic, partitions)
            .into_iter()
            .map(|(partition, messages)| {
                let payloads = messages
                    .into_iter()
                    .map(|(offset, message)| (offset, message.payload))
                    .collect();
                (partition, payloads)
            })
            .collect()
    }

    /// Every message of `topic` (partition → offset → message): read up to the high watermarks
    /// taken first (reading only "until it stays quiet" can come back short on a busy machine),
    /// and on until it stays quiet (tansu 0.6 may report a high watermark behind its log).
    pub fn read_messages(
        &self,
        topic: &str,
        partitions: u32,
    ) -> BTreeMap<i32, BTreeMap<i64, TopicMessage>> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", "archiver-test-reader")
            .create()
            .expect("reader");
        let highs: BTreeMap<i32, i64> = (0..partitions as i32)
            .map(|partition| (partition, high_watermark(&consumer, topic, partition)))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            tpl.add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut records: BTreeMap<i32, BTreeMap<i64, TopicMessage>> = BTreeMap::new();
        let reached = |records: &BTreeMap<i32, BTreeMap<i64, TopicMessage>>| {
            highs.iter().all(|(partition, &high)| {
                high == 0
                    || records
                        .get(partition)
                        .and_then(|messages| messages.keys().next_back())
                        .is_some_and(|&last| last + 1 >= high)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = Instant::now();
        while !reached(&records) || last.elapsed() < Duration::from_secs(2) {
            assert!(
                Instant::now() < deadline,
                "reading {topic}: high watermarks {highs:?} not reached; read up to {:?}",
                records
                    .iter()
                    .map(|(p, m)| (*p, m.keys().next_back().copied()))
                    .collect::<BTreeMap<_, _>>()
            );
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            last = Instant::now();
            // A header key may be any bytes, on which rdkafka's own `headers()` panics.
            let headers = kafka_s3_archiver::kafka_client::headers::read_all(&message);
            records.entry(message.partition()).or_default().insert(
                message.offset(),
                TopicMessage {
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers,
                },
            );
        }
        records
    }

    /// Each partition's first offset still in the log (what retention or DeleteRecords left).
    pub fn log_starts(&self, partitions: u32) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer = self.client().create().expect("consumer");
        (0..partitions as i32)
            .map(|partition| {
                let (low, _) = consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                    .expect("watermarks");
                (partition, low)
            })
            .collect()
    }

    /// The group's committed offsets with their metadata.
    pub fn committed_with_metadata(&self, partitions: u32) -> BTreeMap<i32, (Option<i64>, String)> {
        self.committed_in("archiver-test", partitions)
    }

    /// Another group's committed offsets with their metadata.
    pub fn committed_in(
        &self,
        group: &str,
        partitions: u32,
    ) -> BTreeMap<i32, (Option<i64>, String)> {
        self.committed_on(&self.topic, group, partitions)
    }

    /// A group's committed offsets of another topic, with their metadata.
    pub fn committed_on(
        &self,
        topic: &str,
        group: &str,
        partitions: u32,
    ) -> BTreeMap<i32, (Option<i64>, String)> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            tpl.add_partition(topic, partition);
        }
        consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets")
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (e.partition(), (offset, e.metadata().to_string()))
            })
            .collect()
    }

    /// The group's committed offsets.
    pub fn committed(&self, partitions: u32) -> BTreeMap<i32, Option<i64>> {
        self.committed_with_metadata(partitions)
            .into_iter()
            .map(|(partition, (offset, _))| (partition, offset))
            .collect()
    }

    /// Archives the topic to its end with one archiver on a fresh volume (`data-{name}`), on a
    /// 3-second schedule with `extra` settings on top, then stops it; fails the test if the
    /// archiver does not get there or does not stop cleanly.
    pub fn archive_to_the_end(&self, name: &str, partitions: u32, extra: &[(&str, &str)]) {
        let records = self.read_topic(partitions);
        let mut settings = vec![
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ];
        settings.extend_from_slice(extra);
        let data = self.dir.path().join(format!("data-{name}"));
        let mut archiver = self.archiver(name, &data, &settings);
        self.wait_committed(
            &end_offsets(&records),
            Duration::from_secs(180),
            &mut [&mut archiver],
        );
        let status = archiver.terminate(Duration::from_secs(40));
        assert!(status.success(), "{}", archiver.log_text());
    }

    /// Waits until the group committed `ends` (partition → one past the last offset).
    pub fn wait_committed(
        &self,
        ends: &BTreeMap<i32, i64>,
        within: Duration,
        archivers: &mut [&mut Process],
    ) {
        self.wait_committed_in("archiver-test", ends, within, archivers)
    }

    /// Waits until `group` committed `ends`.
    pub fn wait_committed_in(
        &self,
        group: &str,
        ends: &BTreeMap<i32, i64>,
        within: Duration,
        archivers: &mut [&mut Process],
    ) {
        self.wait_committed_on(&self.topic, group, ends, within, archivers)
    }

    /// Waits until `group` committed `ends` of `topic`.
    pub fn wait_committed_on(
        &self,
        topic: &str,
        group: &str,
        ends: &BTreeMap<i32, i64>,
        within: Duration,
        archivers: &mut [&mut Process],
    ) {
        let deadline = Instant::now() + within;
        loop {
            let committed: BTreeMap<i32, Option<i64>> = self
                .committed_on(topic, group, ends.len() as u32)
                .into_iter()
                .map(|(partition, (offset, _))| (partition, offset))
                .collect();
            let done = ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end));
            if done {
                return;
            }
            if self.broker.is_gone() {
                panic!(
                    "{BROKER_GONE}; its log:\n{}",
                    self.broker.process.log_text()
                );
            }
            for archiver in archivers.iter_mut() {
                if let Ok(Some(status)) = archiver.child.try_wait() {
                    panic!("archiver exited with {status}:\n{}", archiver.log_text());
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = archivers.iter().map(|a| a.log_text()).collect();
                panic!(
                    "not committed within {within:?}: committed {committed:?}, expected {ends:?}\n{}",
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs, buffers and downloads of a failed test for a look.
            self.dir.disable_cleanup(true);
            eprintln!("test files kept in {}", self.dir.path().display());
        }
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Keys as bytes: a producer may send any.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl TopicMessage {
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .and_then(|(_, v)| v.as_deref())
    }
}

/// A partition's high watermark, asked until the broker answers (the mock cluster may still be
/// coming back from a restart).
fn high_watermark(consumer: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
            Ok((_, high)) => return high,
            Err(error) if Instant::now() < deadline => {
                eprintln!("high watermark of {topic}/{partition}: {error}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => panic!("high watermark of {topic}/{partition}: {error}"),
        }
    }
}

/// A reader following the topic (see [`Rig::tail_topic`]).
pub struct TopicTail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<TopicRecords>>,
}

/// Partition → offset → payload.
pub type TopicRecords = BTreeMap<i32, BTreeMap<i64, Vec<u8>>>;

impl TopicTail {
    /// Every record it read (partition → offset → payload), once the topic has been quiet for
    /// two seconds.
    pub fn finish(mut self) -> TopicRecords {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("tail reader thread")
    }
}
