//! The shared end-to-end harness: starts real servers (tansu as the Kafka broker, moto as the S3
//! server) as separate processes on free local ports, runs the archiver binary as a process that
//! can be killed, and reads back what landed in Kafka and in the bucket (through awscli, the
//! client the Segment docs tell users to download with).
//!
//! Server binaries come from `TANSU_BIN`, `MOTO_SERVER` and `AWS_CLI` (set by `scripts/test.sh`,
//! which installs them), or from `PATH`.

#![allow(dead_code)]

pub mod s3_proxy;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

pub const BUCKET: &str = "archive-test";
pub const ARCHIVER: &str = env!("CARGO_BIN_EXE_kafka-s3-archiver");

fn tool(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

/// A plain HTTP/1.0 GET on a local port: (status code, body); (0, "") if nothing listens.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Write;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not listen on port {port} within 30s");
}

fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A process killed when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    /// Port of an archiver's /metrics, /healthz and /readyz.
    pub metrics_port: Option<u16>,
}

impl Process {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn spawn_logged(command: Command, log: PathBuf) -> Process {
        Process::spawn(command, log)
    }

    fn spawn(mut command: Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("create log file");
        command
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .stdin(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process {
            child,
            log,
            metrics_port: None,
        }
    }

    /// GET on the archiver's metrics server: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(
            self.metrics_port.expect("an archiver with a metrics port"),
            path,
        )
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Scrapes /metrics: series (name with labels) → value.
    pub fn scrape(&self) -> BTreeMap<String, f64> {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "process did not exit within {within:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type ControlChannel = (
    std::process::ChildStdin,
    std::io::BufReader<std::process::ChildStdout>,
);

/// The Kafka-protocol broker of a test: tansu (a real broker, in memory; drops commit
/// metadata) or librdkafka's mock cluster in its own process (keeps metadata, injects faults).
pub struct Broker {
    pub process: Process,
    pub bootstrap: String,
    /// The mock cluster's command channel.
    control: Option<std::sync::Mutex<ControlChannel>>,
    pub keeps_commit_metadata: bool,
}

impl Broker {
    pub fn start_tansu(dir: &Path, topic: &str, partitions: u32) -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(tool("TANSU_BIN", "tansu"));
        command
            .current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"]);
        let mut process = Process::spawn(command, dir.join("tansu.log"));
        wait_for_port(port, "tansu", &mut process.child, &process.log);
        run_ok(
            Command::new(tool("TANSU_BIN", "tansu"))
                .args([
                    "topic",
                    "create",
                    topic,
                    "--partitions",
                    &partitions.to_string(),
                ])
                .args(["--broker", &url]),
        );
        Broker {
            process,
            bootstrap: format!("127.0.0.1:{port}"),
            control: None,
            keeps_commit_metadata: false,
        }
    }

    /// The mock cluster (`examples/mock_kafka.rs`), three brokers.
    pub fn start_mock(dir: &Path, topic: &str, partitions: u32) -> Broker {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("test executable");
        let binary = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("examples")
            .join("mock_kafka");
        let mut command = Command::new(&binary);
        command
            .args([
                "--brokers",
                "3",
                "--partitions",
                &partitions.to_string(),
                "--topic",
                topic,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("mock_kafka.log")).unwrap());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} (cargo build --examples): {e}",
                binary.display()
            )
        });
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("mock_kafka output");
        let bootstrap = line
            .trim()
            .strip_prefix("bootstrap=")
            .unwrap_or_else(|| panic!("mock_kafka said {line:?}"))
            .to_string();
        Broker {
            process: Process {
                child,
                log: dir.join("mock_kafka.log"),
                metrics_port: None,
            },
            bootstrap,
            control: Some(std::sync::Mutex::new((stdin, stdout))),
            keeps_commit_metadata: true,
        }
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Sends a fault command to the mock cluster (`down 1`, `errors OffsetCommit ...`).
    pub fn control(&self, command: &str) {
        use std::io::{BufRead, Write};
        let mut channel = self
            .control
            .as_ref()
            .expect("only the mock cluster takes commands")
            .lock()
            .unwrap();
        let (stdin, stdout) = &mut *channel;
        writeln!(stdin, "{command}").unwrap();
        let mut answer = String::new();
        stdout.read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), "ok", "mock_kafka: {command}");
    }
}

/// moto's S3 server, in memory.
pub struct S3Server {
    pub process: Process,
    pub port: u16,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let port = free_port();
        let mut command = Command::new(tool("MOTO_SERVER", "moto_server"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Process::spawn(command, dir.join("moto.log"));
        wait_for_port(port, "moto_server", &mut process.child, &process.log);
        let server = S3Server { process, port };
        server.aws(&["s3", "mb", &format!("s3://{BUCKET}")]);
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs awscli against this server.
    pub fn aws(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new(tool("AWS_CLI", "aws"))
                .args(["--endpoint-url", &self.endpoint(), "--region", "us-east-1"])
                .args(args)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    }

    /// The batch manifests in the bucket, parsed.
    pub fn manifests(&self, dir: &Path) -> Vec<serde_json::Value> {
        let out = dir.join("manifests");
        self.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}/segment-logs/_manifests"),
            out.to_str().unwrap(),
        ]);
        if !out.exists() {
            return Vec::new();
        }
        files_under(&out)
            .values()
            .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
            .collect()
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        self.versions().into_keys().collect()
    }

    /// Every key with its ETag and last-modified time: what changes when an object is
    /// rewritten, even with the same bytes.
    pub fn versions(&self) -> BTreeMap<String, (String, String)> {
        let output = self.aws(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            BUCKET,
            "--output",
            "json",
        ]);
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        listing["Contents"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        let field = |name: &str| i[name].as_str().unwrap_or_default().to_string();
                        (field("Key"), (field("ETag"), field("LastModified")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `aws s3 sync` of the whole bucket into `dir`.
    pub fn download(&self, dir: &Path) {
        self.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}"),
            dir.to_str().unwrap(),
        ]);
    }

    pub fn head(&self, key: &str) -> serde_json::Value {
        let output = self.aws(&[
            "s3api",
            "head-object",
            "--bucket",
            BUCKET,
            "--key",
            key,
            "--output",
            "json",
        ]);
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// The brokers and store a test runs against, and its scratch directory.
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

    /// Runs `kafka-s3-archiver verify --json [--deep]` against this rig.
    pub fn verify(&self, deep: bool) -> (bool, serde_json::Value) {
        let mut command = Command::new(ARCHIVER);
        command
            .args(["verify", "--json"])
            .env_clear()
            .envs(self.env(&self.dir.path().join("verify-unused")));
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

    /// Starts `kafka-s3-archiver produce` in the background at `rate` events per second.
    pub fn produce_in_background(&self, count: u64, rate: u64, seed: u64) -> Process {
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
                "20",
                "--days",
                "3",
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
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", "archiver-test-reader")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            tpl.add_partition_offset(&self.topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut records: BTreeMap<i32, BTreeMap<i64, Vec<u8>>> = BTreeMap::new();
        let mut last = Instant::now();
        while last.elapsed() < Duration::from_secs(2) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                last = Instant::now();
                records.entry(message.partition()).or_default().insert(
                    message.offset(),
                    message.payload().unwrap_or_default().to_vec(),
                );
            }
        }
        records
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
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            tpl.add_partition(&self.topic, partition);
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
        let deadline = Instant::now() + within;
        loop {
            let committed: BTreeMap<i32, Option<i64>> = self
                .committed_in(group, ends.len() as u32)
                .into_iter()
                .map(|(partition, (offset, _))| (partition, offset))
                .collect();
            let done = ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end));
            if done {
                return;
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

/// One past the last offset of each partition.
pub fn end_offsets(records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>) -> BTreeMap<i32, i64> {
    records
        .iter()
        .map(|(&p, offsets)| (p, offsets.keys().next_back().map_or(0, |o| o + 1)))
        .collect()
}

/// Decompresses a file as exactly one gzip member (as readers that stop after the first member
/// do) and fails if anything follows it.
pub fn gunzip_single_member(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let mut decoder = flate2::bufread::GzDecoder::new(&bytes[..]);
    let mut out = Vec::new();
    decoder
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: not a valid gzip member: {e}", path.display()));
    let rest = decoder.into_inner();
    assert!(
        rest.is_empty(),
        "{}: {} bytes follow the first gzip member",
        path.display(),
        rest.len()
    );
    out
}

/// Every file under `dir`, relative path → absolute path.
pub fn files_under(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.insert(relative, path);
            }
        }
    }
    files
}

/// Multiset of byte strings.
pub fn multiset<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> HashMap<&'a [u8], usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts
}

/// One object of the archive, decompressed.
#[derive(Debug)]
pub struct ArchivedObject {
    pub key: String,
    pub source: String,
    pub day: String,
    pub partition: i32,
    pub first_offset: i64,
    pub lines: Vec<Vec<u8>>,
    pub uncompressed_len: usize,
}

/// Parses and decompresses every event object downloaded to `dir` (dead letters and manifests,
/// under `_` folders, are left out).
pub fn archived_objects(dir: &Path, topic: &str) -> Vec<ArchivedObject> {
    let mut objects = Vec::new();
    for (key, path) in files_under(dir) {
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts[0], "segment-logs", "{key}");
        if parts[1].starts_with('_') {
            continue;
        }
        assert_eq!(parts.len(), 4, "unexpected key layout: {key}");
        let name = parts[3]
            .strip_suffix(".gz")
            .unwrap_or_else(|| panic!("{key}: not .gz"));
        let rest = name
            .strip_prefix(&format!("{topic}-"))
            .unwrap_or_else(|| panic!("{key}: name does not start with the topic"));
        let (partition, offset) = rest.split_once('-').expect("partition-offset");
        assert_eq!(
            offset.len(),
            20,
            "{key}: offset not zero-padded to 20 digits"
        );
        let content = gunzip_single_member(&path);
        assert!(content.ends_with(b"\n"), "{key}: last line not terminated");
        let lines: Vec<Vec<u8>> = content[..content.len() - 1]
            .split(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        objects.push(ArchivedObject {
            source: parts[1].to_string(),
            day: parts[2].to_string(),
            partition: partition.parse().expect("partition number"),
            first_offset: offset.parse().expect("offset number"),
            uncompressed_len: content.len(),
            key,
            lines,
        });
    }
    objects
}

/// Checks that the archive holds every record of `records` below `upto` (all when `None`)
/// exactly once, in the object its source, received-day, partition and offsets call for.
pub fn assert_exactly_once(
    objects: &[ArchivedObject],
    records: &BTreeMap<i32, BTreeMap<i64, Vec<u8>>>,
    upto: Option<&BTreeMap<i32, i64>>,
) {
    let mut where_from: HashMap<&[u8], (i32, i64)> = HashMap::new();
    for (&partition, offsets) in records {
        for (&offset, payload) in offsets {
            let previous = where_from.insert(payload.as_slice(), (partition, offset));
            assert!(
                previous.is_none(),
                "the producer wrote the same payload twice"
            );
        }
    }
    let mut seen: BTreeMap<i32, BTreeMap<i64, usize>> = BTreeMap::new();
    for object in objects {
        let mut previous = None;
        for (index, line) in object.lines.iter().enumerate() {
            let &(partition, offset) = where_from.get(line.as_slice()).unwrap_or_else(|| {
                let at_first = records
                    .get(&object.partition)
                    .and_then(|offsets| offsets.get(&object.first_offset));
                panic!(
                    "{}: line {index} is not a produced event: {}\n(the topic holds at offset {}: {})",
                    object.key,
                    String::from_utf8_lossy(line),
                    object.first_offset,
                    at_first.map_or("nothing".into(), |p| String::from_utf8_lossy(p).to_string())
                )
            });
            assert_eq!(
                partition, object.partition,
                "{}: record of another partition",
                object.key
            );
            if index == 0 {
                assert_eq!(
                    offset, object.first_offset,
                    "{}: key names the wrong first offset",
                    object.key
                );
            }
            assert!(
                previous < Some(offset),
                "{}: offsets out of order",
                object.key
            );
            previous = Some(offset);
            *seen
                .entry(partition)
                .or_default()
                .entry(offset)
                .or_insert(0) += 1;

            let event: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(
                event["projectId"].as_str(),
                Some(object.source.as_str()),
                "{}",
                object.key
            );
            let received =
                chrono::DateTime::parse_from_rfc3339(event["receivedAt"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&chrono::Utc);
            let midnight = received
                .date_naive()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc();
            // Any of the day formats: members with other rules may share a bucket.
            let day = received.date_naive();
            let folders = [
                (midnight.timestamp() * 1000).to_string(),
                day.format("%Y-%m-%d").to_string(),
                day.format("day=%Y-%m-%d").to_string(),
            ];
            assert!(
                folders.contains(&object.day),
                "{}: event received {received} is in the wrong day folder",
                object.key
            );
        }
    }
    for (&partition, offsets) in records {
        let limit = upto.map_or(i64::MAX, |u| u.get(&partition).copied().unwrap_or(0));
        let seen_here = seen.remove(&partition).unwrap_or_default();
        let duplicated: Vec<_> = seen_here
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(o, _)| *o)
            .collect();
        assert!(
            duplicated.is_empty(),
            "partition {partition}: offsets archived twice: {duplicated:?}"
        );
        let missing: Vec<i64> = offsets
            .keys()
            .filter(|&&o| o < limit && !seen_here.contains_key(&o))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: {} offsets missing, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        let extra: Vec<&i64> = seen_here.keys().filter(|&&o| o >= limit).collect();
        assert!(
            extra.is_empty(),
            "partition {partition}: offsets at or past {limit} archived: {extra:?}"
        );
    }
}

/// Lines of `log` matching `needle`, with `key=value` fields split out.
pub fn log_events(log: &str, needle: &str) -> Vec<HashMap<String, String>> {
    log.lines()
        .filter(|line| line.contains(needle))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|field| field.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}
