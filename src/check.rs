//! Check: proves the configuration works before any record is read — the brokers answer, the
//! topic exists, the consumer group can be described, and the bucket takes a probe object under
//! the prefix (written and deleted, as Segment validates a bucket). `kafka-s3-archiver check`
//! prints one line per check; `run` performs the same checks at start-up and refuses to start
//! on a failure, so a wrong bucket or a missing topic is an error that names its cause, not an
//! endless retry loop.
//!
//! Nothing printed here includes a secret: only addresses, names and the causes the servers give.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use crate::config::Config;
use crate::kafka_client::inspector;
use crate::layout;
use crate::upload::s3::S3Store;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    /// The service did not answer (timeouts, 5xx, connection refused): nothing proven, but an
    /// outage to ride out, not a mistake to fix. `run` starts anyway and keeps retrying.
    Unavailable,
    /// Something the operator must fix: a missing bucket or topic, denied access, bad
    /// credentials, no broker at the configured address.
    Failed,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl CheckResult {
    fn pass(name: &'static str, detail: String) -> CheckResult {
        CheckResult {
            name,
            status: Status::Ok,
            detail,
        }
    }

    fn fail(name: &'static str, detail: String) -> CheckResult {
        CheckResult {
            name,
            status: Status::Failed,
            detail,
        }
    }

    pub fn ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// `ok   kafka: ...`, `WAIT s3: ...` or `FAIL s3: ...`.
    pub fn line(&self) -> String {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Unavailable => "WAIT",
            Status::Failed => "FAIL",
        };
        format!("{tag} {}: {}", self.name, self.detail)
    }
}

/// The failed checks, as the error `run` stops with.
#[derive(Debug, thiserror::Error)]
#[error("start-up checks failed:\n  {}", failed.iter().map(CheckResult::line).collect::<Vec<_>>().join("\n  "))]
pub struct CheckError {
    pub failed: Vec<CheckResult>,
}

/// Runs every check; later checks that depend on a failed one are skipped.
pub async fn run_checks(config: &Config) -> Vec<CheckResult> {
    let kafka_config = config.clone();
    let mut results = tokio::task::spawn_blocking(move || kafka_checks(&kafka_config))
        .await
        .expect("kafka check thread");
    results.push(s3_check(config).await);
    results
}

/// The start-up checks of `run`: `Err` with the checks that failed for a reason the operator
/// must fix; unavailable services are only logged.
pub async fn preflight(config: &Config) -> Result<Vec<CheckResult>, CheckError> {
    let results = run_checks(config).await;
    for result in results.iter().filter(|r| r.status == Status::Unavailable) {
        tracing::warn!(check = result.name, detail = %result.detail, "start-up check inconclusive; starting anyway and retrying");
    }
    let failed: Vec<CheckResult> = results
        .iter()
        .filter(|r| r.status == Status::Failed)
        .cloned()
        .collect();
    if failed.is_empty() {
        Ok(results)
    } else {
        Err(CheckError { failed })
    }
}

fn kafka_checks(config: &Config) -> Vec<CheckResult> {
    let brokers = &config.kafka.brokers;
    let consumer = match inspector(&config.kafka) {
        Ok(consumer) => consumer,
        Err(err) => {
            return vec![CheckResult::fail(
                "kafka",
                format!(
                    "cannot create a client for {brokers}: {}",
                    config.redact(&err.to_string())
                ),
            )]
        }
    };
    let topic = &config.kafka.topic;
    let metadata = match consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT) {
        Ok(metadata) => metadata,
        Err(err) => {
            return vec![CheckResult::fail(
                "kafka",
                format!(
                    "no broker at {brokers} answered within {}s: {}",
                    KAFKA_TIMEOUT.as_secs(),
                    config.redact(&err.to_string())
                ),
            )]
        }
    };
    let mut results = vec![CheckResult::pass(
        "kafka",
        format!(
            "{} broker(s) reachable through {brokers}",
            metadata.brokers().len()
        ),
    )];
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    results.push(match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => CheckResult::pass(
            "topic",
            format!("{topic} has {} partition(s)", t.partitions().len()),
        ),
        Some(t) => CheckResult::fail(
            "topic",
            match t.error() {
                Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                    format!("{topic} does not exist")
                }
                Some(
                    rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
                ) => {
                    format!("not authorized to describe {topic} (check the ACLs of this principal)")
                }
                Some(code) => format!("{topic}: the broker answered {code:?}"),
                None => format!("{topic} has no partitions"),
            },
        ),
        None => CheckResult::fail("topic", format!("{topic} does not exist")),
    });
    let group = &config.kafka.group_id;
    results.push(
        match consumer.fetch_group_list(Some(group), KAFKA_TIMEOUT) {
            Ok(list) => {
                let state = list
                    .groups()
                    .iter()
                    .find(|g| g.name() == group)
                    .map(|g| g.state().to_string())
                    .unwrap_or_default();
                CheckResult::pass(
                    "group",
                    format!(
                        "{group} can be described ({})",
                        if state.is_empty() {
                            "new".to_string()
                        } else {
                            state
                        }
                    ),
                )
            }
            // Only a refusal is the operator's to fix; a broker that cannot list groups
            // (librdkafka's mock cluster, some proxies) proves nothing either way.
            Err(err)
                if matches!(
                    err.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::GroupAuthorizationFailed
                            | RDKafkaErrorCode::ClusterAuthorizationFailed
                    )
                ) =>
            {
                CheckResult::fail(
                    "group",
                    format!("not authorized for consumer group {group} (check the ACLs): {err}"),
                )
            }
            Err(err) => CheckResult {
                name: "group",
                status: Status::Unavailable,
                detail: format!("cannot describe consumer group {group}: {err}"),
            },
        },
    );
    results
}

async fn s3_check(config: &Config) -> CheckResult {
    let store = S3Store::connect(&config.s3).await;
    let bucket = store.bucket().to_string();
    let key = format!(
        "{}{}/_check/{}-{}.txt",
        config.s3.prefix,
        layout::ROOT,
        config.kafka.group_id,
        chrono::Utc::now().timestamp_millis()
    );
    let body = b"kafka-s3-archiver write check; safe to delete\n".to_vec();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Err(err) = store.put_bytes(&key, body.clone(), "text/plain").await else {
            break;
        };
        let transient = err.class == crate::retry::ErrorClass::Transient;
        if transient && attempt < 4 {
            tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            continue;
        }
        return CheckResult {
            name: "s3",
            status: if transient {
                Status::Unavailable
            } else {
                Status::Failed
            },
            detail: format!(
                "cannot write s3://{bucket}/{key}: {}{}",
                err.code
                    .as_deref()
                    .map_or(String::new(), |c| format!("{c}: ")),
                explain(&err.code, &err.message)
            ),
        };
    }
    match store
        .client()
        .delete_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(_) => CheckResult::pass(
            "s3",
            format!("s3://{bucket}/{} accepts objects (probe written and deleted)", config.s3.prefix),
        ),
        Err(err) => CheckResult::pass(
            "s3",
            format!(
                "s3://{bucket}/{} accepts objects; the probe {key} could not be deleted ({}) and can be removed by hand",
                config.s3.prefix,
                aws_sdk_s3::error::DisplayErrorContext(&err)
            ),
        ),
    }
}

/// A one-line cause for the S3 errors users cause themselves.
fn explain(code: &Option<String>, message: &str) -> String {
    match code.as_deref() {
        Some("NoSuchBucket") => "the bucket does not exist (check s3.bucket and s3.region)".into(),
        Some("AccessDenied") => "access denied: the credentials may not s3:PutObject under the prefix (see the README's IAM policy)".into(),
        Some("InvalidAccessKeyId") => "the access key is unknown to S3 (check the credential chain: env, profile, IRSA)".into(),
        Some("SignatureDoesNotMatch") => "the secret key does not match the access key".into(),
        Some("PermanentRedirect") | Some("AuthorizationHeaderMalformed") => {
            "the bucket is in another region (check s3.region)".into()
        }
        _ => message.lines().next().unwrap_or(message).to_string(),
    }
}
