//! A Kafka cluster for fault tests (dev and test only): librdkafka's mock cluster, the one
//! librdkafka's own test-suite uses, in a process of its own so tests can `kill -9` archivers
//! without taking the brokers with them. Unlike tansu it keeps offset-commit metadata, which the
//! exactly-once protocol needs.
//!
//! Prints `bootstrap=HOST:PORT,...` once ready, then reads commands from stdin, one per line,
//! answering `ok` or `error: ...`; exits when stdin closes:
//!
//! - `down BROKER` / `up BROKER`: take a broker down or bring it back (ids from 1);
//! - `topic NAME PARTITIONS`: create another topic (a restore's target);
//! - `rtt BROKER MILLIS`: add round-trip time to a broker;
//! - `errors API ERROR COUNT`: fail the next COUNT requests of API (e.g. `OffsetCommit`) with
//!   ERROR (e.g. `REBALANCE_IN_PROGRESS`); `clear API` forgets them.
//!
//! Usage: `mock_kafka --brokers 3 --topic segment-events --partitions 4`

use std::io::{BufRead, Write};
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn main() {
    let mut brokers = 3;
    let mut topics: Vec<(String, i32)> = Vec::new();
    let mut partitions = 4;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--brokers" => brokers = value.parse().unwrap_or_else(|_| usage("bad --brokers")),
            "--partitions" => {
                partitions = value.parse().unwrap_or_else(|_| usage("bad --partitions"));
                if let Some(last) = topics.last_mut() {
                    last.1 = partitions;
                }
            }
            "--topic" => topics.push((value, partitions)),
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    let cluster = MockCluster::new(brokers).unwrap_or_else(|e| fail(&format!("cannot start: {e}")));
    for (topic, partitions) in &topics {
        cluster
            .create_topic(topic, *partitions, brokers.min(3))
            .unwrap_or_else(|e| fail(&format!("cannot create {topic}: {e}")));
    }
    println!("bootstrap={}", cluster.bootstrap_servers());
    std::io::stdout().flush().expect("stdout");

    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["down", id] => {
                parse(id).and_then(|id| cluster.broker_down(id).map_err(|e| e.to_string()))
            }
            ["up", id] => parse(id).and_then(|id| cluster.broker_up(id).map_err(|e| e.to_string())),
            ["topic", name, partitions] => partitions
                .parse()
                .map_err(|_| "bad partitions".to_string())
                .and_then(|partitions| {
                    cluster
                        .create_topic(name, partitions, brokers.min(3))
                        .map_err(|e| e.to_string())
                }),
            ["rtt", id, millis] => parse(id).and_then(|id| {
                let millis: u64 = millis.parse().map_err(|_| "bad millis".to_string())?;
                cluster
                    .broker_round_trip_time(id, Duration::from_millis(millis))
                    .map_err(|e| e.to_string())
            }),
            ["errors", api, error, count] => api_key(api).and_then(|api| {
                let error = error_code(error)?;
                let count: usize = count.parse().map_err(|_| "bad count".to_string())?;
                cluster.request_errors(api, &vec![error; count]);
                Ok(())
            }),
            ["clear", api] => api_key(api).map(|api| cluster.clear_request_errors(api)),
            [] => continue,
            _ => Err(format!("unknown command: {line}")),
        };
        match result {
            Ok(()) => println!("ok"),
            Err(err) => println!("error: {err}"),
        }
        std::io::stdout().flush().expect("stdout");
    }
}

fn parse(id: &str) -> Result<i32, String> {
    id.parse().map_err(|_| format!("bad broker id {id}"))
}

fn api_key(name: &str) -> Result<RDKafkaApiKey, String> {
    Ok(match name {
        "Produce" => RDKafkaApiKey::Produce,
        "Fetch" => RDKafkaApiKey::Fetch,
        "ListOffsets" => RDKafkaApiKey::ListOffsets,
        "Metadata" => RDKafkaApiKey::Metadata,
        "OffsetCommit" => RDKafkaApiKey::OffsetCommit,
        "OffsetFetch" => RDKafkaApiKey::OffsetFetch,
        "FindCoordinator" => RDKafkaApiKey::FindCoordinator,
        "JoinGroup" => RDKafkaApiKey::JoinGroup,
        "Heartbeat" => RDKafkaApiKey::Heartbeat,
        "SyncGroup" => RDKafkaApiKey::SyncGroup,
        _ => return Err(format!("unknown api {name}")),
    })
}

fn error_code(name: &str) -> Result<RDKafkaRespErr, String> {
    use RDKafkaRespErr::*;
    Ok(match name {
        "REBALANCE_IN_PROGRESS" => RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
        "NOT_COORDINATOR" => RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
        "COORDINATOR_NOT_AVAILABLE" => RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        "COORDINATOR_LOAD_IN_PROGRESS" => RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
        "REQUEST_TIMED_OUT" => RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "ILLEGAL_GENERATION" => RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
        "UNKNOWN_MEMBER_ID" => RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
        "NOT_LEADER_FOR_PARTITION" => RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        "FENCED_INSTANCE_ID" => RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID,
        "INVALID_SESSION_TIMEOUT" => RD_KAFKA_RESP_ERR_INVALID_SESSION_TIMEOUT,
        _ => return Err(format!("unknown error {name}")),
    })
}

fn usage(problem: &str) -> ! {
    fail(&format!(
        "{problem}\nusage: mock_kafka [--brokers N] [--partitions P] --topic NAME ..."
    ))
}

fn fail(message: &str) -> ! {
    eprintln!("mock_kafka: {message}");
    std::process::exit(2)
}
