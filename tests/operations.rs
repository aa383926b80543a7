//! Operations: the alert rules (promtool), the Kubernetes manifests (kubernetes-validate and
//! checks of the custom resources), docker-compose.yml (docker-compose config), and a real
//! Prometheus scraping a running archiver, whose API answers every query of the Grafana
//! dashboard.
//!
//! Tools come from `PROMETHEUS_BIN`, `PROMTOOL_BIN`, `DOCKER_COMPOSE_BIN` and `OPS_PYTHON` (set by
//! `scripts/test.sh`, which installs them), or from `PATH`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kafka_s3_archiver::config::Config;
use support::*;

fn tool(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let rules = repo().join("deploy/prometheus");
    let check = run(Command::new(tool("PROMTOOL_BIN", "promtool"))
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&rules));
    assert!(check.contains("SUCCESS: 12 rules found"), "{check}");
    let tests = run(Command::new(tool("PROMTOOL_BIN", "promtool"))
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&rules));
    assert!(tests.contains("SUCCESS"), "{tests}");
}

#[test]
fn kubernetes_manifests_validate_and_their_configs_load() {
    let output = run(Command::new(tool("OPS_PYTHON", "python3"))
        .arg(repo().join("tests/ops/check_deploy.py"))
        .arg(repo()));
    let dir = tempfile::tempdir().unwrap();
    let mut loaded = 0;
    for section in output.split("--- CONFIG ").skip(1) {
        let (name, text) = section.split_once('\n').unwrap();
        let path = dir.path().join("archiver.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), Vec::new(), &[])
            .unwrap_or_else(|e| panic!("{name} is not a valid archiver config: {e}"));
        loaded += 1;
    }
    assert_eq!(
        loaded, 2,
        "expected the base ConfigMap's and the overlay's configs:\n{output}"
    );
}

#[test]
fn docker_compose_file_is_valid() {
    let config = run(Command::new(tool("DOCKER_COMPOSE_BIN", "docker-compose"))
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(repo()));
    for service in [
        "kafka",
        "minio",
        "archiver",
        "loadgen",
        "prometheus",
        "grafana",
    ] {
        assert!(
            config.contains(&format!("  {service}:")),
            "{service} missing:\n{config}"
        );
    }
    // The consoles and the demo credentials are for this machine only.
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut published = Vec::new();
    let mut in_ports = false;
    for line in compose.lines().map(str::trim) {
        if line == "ports:" {
            in_ports = true;
        } else if in_ports && line.starts_with("- ") {
            published.push(line);
        } else {
            in_ports = false;
        }
    }
    assert!(
        !published.is_empty(),
        "no published ports found in docker-compose.yml"
    );
    for line in published {
        assert!(
            line.starts_with("- \"127.0.0.1:"),
            "docker-compose.yml publishes {line} on every interface"
        );
    }
}

/// A running Prometheus server.
struct Prometheus {
    process: Process,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[u16]) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: archiver\n    static_configs:\n      - targets: [{}]\n        labels: {{namespace: test, pod: archiver-0}}\n",
                repo().join("deploy/prometheus/alerts.yml").display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let mut command = Command::new(tool("PROMETHEUS_BIN", "prometheus"));
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ));
        let process = Process::spawn_logged(command, dir.join("prometheus.log"));
        let prometheus = Prometheus { process, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get("/-/ready").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn get(&self, path_and_query: &str) -> (u16, String) {
        http_get(self.port, path_and_query)
    }

    /// An instant query: the result vector, or the error Prometheus gives.
    fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let (_, body) = self.get(&format!("/api/v1/query?query={}", url_encode(promql)));
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{promql}: {}", answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of a query that returns one series.
    fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).unwrap();
        let value = result.first()?["value"][1].as_str()?.parse().ok();
        value
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until `check` holds, querying again every half second.
fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Metric names a PromQL expression or a rule uses (histogram suffixes folded).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("archiver_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_string());
        i = end;
    }
    names
}

#[test]
fn prometheus_scrapes_the_archiver_and_answers_every_dashboard_query() {
    let rig = Rig::start_mock(2);
    let mut archiver = rig.archiver(
        "archiver",
        &rig.dir.path().join("data"),
        &[
            ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "10"),
            ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
        ],
    );
    let prometheus = Prometheus::start(rig.dir.path(), &[archiver.metrics_port.unwrap()]);
    eventually("archiver scraped", Duration::from_secs(30), || {
        prometheus.value("up{job=\"archiver\"}") == Some(1.0)
    });

    // Produce just after an upload slot, so the records wait several seconds for the next one.
    while chrono::Utc::now().timestamp() % 10 != 1 {
        std::thread::sleep(Duration::from_millis(100));
    }
    rig.produce(3_000, 3, 2, 31);
    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    rig.wait_committed(&ends, Duration::from_secs(120), &mut [&mut archiver]);

    // Consumption rose to everything produced.
    eventually("records counted", Duration::from_secs(30), || {
        prometheus.value("sum(archiver_records_consumed_total)") == Some(3_000.0)
    });
    assert!(
        prometheus
            .value("sum(increase(archiver_records_consumed_total[5m]))")
            .unwrap()
            > 0.0
    );
    // The SLO age climbed while records waited for the upload, and the upload reset it.
    let peak = prometheus
        .value("max(max_over_time(archiver_oldest_unuploaded_record_age_seconds[5m]))")
        .unwrap();
    assert!(peak >= 3.0, "the age peaked at {peak}s");
    eventually(
        "oldest-record age back to 0",
        Duration::from_secs(30),
        || prometheus.value("max(archiver_oldest_unuploaded_record_age_seconds)") == Some(0.0),
    );
    // Lag returns to 0 on both partitions (librdkafka statistics every 5 s).
    for lag in [
        "archiver_consumer_lag_records",
        "archiver_consumer_committed_lag_records",
    ] {
        eventually(&format!("{lag} back to 0"), Duration::from_secs(30), || {
            let lags = prometheus.query(lag).unwrap();
            lags.len() == 2 && lags.iter().all(|s| s["value"][1] == "0")
        });
    }
    assert!(prometheus.value("sum(archiver_commits_total)").unwrap() >= 2.0);
    assert!(
        prometheus
            .value("sum(archiver_objects_uploaded_total)")
            .unwrap()
            >= 2.0
    );
    assert_eq!(
        prometheus.value("sum(archiver_assigned_partitions)"),
        Some(2.0)
    );

    // The alert rules loaded, and none fires on a healthy archiver.
    let (_, rules) = prometheus.get("/api/v1/rules");
    assert!(rules.contains("ArchiverOldestRecordTooOld"), "{rules}");
    let firing = prometheus.query("ALERTS{alertstate=\"firing\"}").unwrap();
    assert!(firing.is_empty(), "alerts firing: {firing:?}");

    // Every dashboard query parses and runs, and names only metrics the archiver exports.
    let (_, exposition) = archiver.http_get("/metrics");
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("dashboards/kafka-s3-archiver.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let runnable = expr.replace("$__rate_interval", "1m");
            prometheus
                .query(&runnable)
                .unwrap_or_else(|e| panic!("panel {:?}: {e}", panel["title"]));
            for name in metric_names(expr) {
                assert!(
                    exported.contains(&name),
                    "panel {:?} uses {name}, which is not exported",
                    panel["title"]
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    for name in metric_names(&alerts) {
        assert!(
            exported.contains(&name),
            "an alert uses {name}, which is not exported"
        );
    }
    assert!(archiver.terminate(Duration::from_secs(40)).success());
}
