//! The Kafka-protocol broker of a test (tansu, or librdkafka's mock cluster in its own process).

use std::path::Path;
use std::process::{Command, Stdio};

use super::*;

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
        let broker = Broker {
            process,
            bootstrap: format!("127.0.0.1:{port}"),
            control: None,
            keeps_commit_metadata: false,
        };
        broker.create_topic(topic, partitions);
        broker
    }

    /// Creates another topic.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        if self.control.is_some() {
            return self.control(&format!("topic {topic} {partitions}"));
        }
        run_ok(
            Command::new(tool("TANSU_BIN", "tansu"))
                .args([
                    "topic",
                    "create",
                    topic,
                    "--partitions",
                    &partitions.to_string(),
                ])
                .args(["--broker", &format!("tcp://{}", self.bootstrap)]),
        );
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

    /// Whether the broker process has exited (not yet reaped: a zombie): a failure to tell apart
    /// from the archiver's, since the mock cluster is a test double with failures of its own.
    pub fn is_gone(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.pid()));
        // The state follows the parenthesised command name.
        stat.map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
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
