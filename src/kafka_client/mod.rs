//! The one way a Kafka client is built from the configuration, for every command that talks to
//! the broker (`run`, `lag`, `check`, `verify`, `produce`, `restore`): the role's defaults first, then the
//! operator's `kafka.properties` (security, tuning), then what the role's guarantees rely on,
//! which no property overrides. Security settings therefore reach every client the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::client::OAuthToken;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::config::{is_secret_property, redact_secrets, KafkaAuth};
use msk_iam::MskIamSigner;

pub mod headers;
pub mod msk_iam;

use crate::config::KafkaConfig;

/// What a client is for, which decides the settings it gets beyond the operator's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole<'a> {
    /// The archiving consumer of `run`: manual commits, cooperative rebalancing.
    Archiver,
    /// A short-lived consumer that only reads metadata, offsets and watermarks (`lag`, `check`,
    /// `verify`): it never joins the group.
    Inspector,
    /// The sample-event producer of `produce`, with the codec its batches use.
    Producer { compression: &'a str },
    /// The idempotent producer of `restore`, holding at most this much unacknowledged.
    Restorer { max_in_flight_kbytes: u64 },
}

/// librdkafka settings the archiving consumer changes unless `kafka.properties` sets them.
const ARCHIVER_DEFAULTS: &[(&str, &str)] = &[
    // Feeds the lag metrics.
    ("statistics.interval.ms", "5000"),
    ("auto.offset.reset", "earliest"),
    // librdkafka's default, said here because a replay depends on it: every member reads the
    // same records of a batch (aborted transactions never), so it cuts the same objects.
    ("isolation.level", "read_committed"),
    // What librdkafka prefetches ahead of the workers; its 64 MB default would be a large share
    // of a pod's memory and buys nothing once the workers are the bottleneck.
    ("queued.max.messages.kbytes", "16384"),
    // librdkafka keeps fetching a partition until it holds this many records (100,000 by
    // default, per partition): with 64 partitions that overran the kilobyte cap above at
    // start-up, the peak of the memory benchmark.
    ("queued.min.messages", "10000"),
    // Queued records point into the fetch response that brought them, which stays in memory
    // until its last record is polled: with many partitions, librdkafka's 50 MB responses held
    // more than the queue itself.
    ("fetch.max.bytes", "16777216"),
    // Once the prefetch queue is full, librdkafka waits this long before fetching that
    // partition again; its 1 s default left the workers starved after every full queue (reading
    // took twice as long in `scripts/bench.sh`).
    ("fetch.queue.backoff.ms", "20"),
];

const INSPECTOR_DEFAULTS: &[(&str, &str)] = &[
    // A wrong address must fail a check or a lag report, not hang it.
    ("socket.connection.setup.timeout.ms", "8000"),
];

const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    // The demo and the tests compare what was archived with what was produced: a retry after a
    // broker restart must not write a record twice (seen without it). A property can turn it off
    // for `produce` against a broker without idempotent producers; `restore` always needs it.
    ("enable.idempotence", "true"),
    ("linger.ms", "20"),
    ("batch.size", "1000000"),
    ("message.timeout.ms", "120000"),
];

/// The client configuration for `role`.
pub fn client_config(kafka: &KafkaConfig, role: ClientRole) -> ClientConfig {
    let mut client = ClientConfig::new();
    if kafka.auth == KafkaAuth::AwsMskIam {
        // MSK's IAM listener; a property can still say SASL_PLAINTEXT (a test broker).
        client.set("security.protocol", "SASL_SSL");
    }
    let defaults = match role {
        ClientRole::Archiver => ARCHIVER_DEFAULTS,
        ClientRole::Inspector => INSPECTOR_DEFAULTS,
        ClientRole::Producer { .. } | ClientRole::Restorer { .. } => PRODUCER_DEFAULTS,
    };
    for (key, value) in defaults {
        client.set(*key, *value);
    }
    for (key, value) in &kafka.properties {
        client.set(key, value);
    }
    client.set("bootstrap.servers", &kafka.brokers);
    if kafka.auth == KafkaAuth::AwsMskIam {
        client.set("sasl.mechanism", "OAUTHBEARER");
    }
    match role {
        ClientRole::Archiver => {
            client
                .set("group.id", &kafka.group_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
                .set("enable.partition.eof", "false")
                .set("client.id", "kafka-s3-archiver");
            if !kafka.group_instance_id.is_empty() {
                client.set("group.instance.id", &kafka.group_instance_id);
            }
        }
        ClientRole::Inspector => {
            // Committed offsets are read per group; nothing is ever committed from here.
            client
                .set("group.id", &kafka.group_id)
                .set("enable.auto.commit", "false")
                .set("client.id", "kafka-s3-archiver-inspect");
        }
        ClientRole::Producer { compression } => {
            client
                .set("compression.type", compression)
                .set("client.id", "kafka-s3-archiver-produce");
        }
        ClientRole::Restorer {
            max_in_flight_kbytes,
        } => {
            // Each partition gets its lines in order and once per producer session: what a
            // crash leaves in a partition is a prefix of what was meant for it.
            client
                .set("enable.idempotence", "true")
                .set(
                    "queue.buffering.max.kbytes",
                    max_in_flight_kbytes.to_string(),
                )
                .set("client.id", "kafka-s3-archiver-restore");
        }
    }
    client
}

/// How a client authenticates beyond its properties: the token source every client context
/// asks when the broker wants an OAUTHBEARER token, and the secrets its messages must not show.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    msk_iam: Option<MskIamSigner>,
    /// The values of the secret properties (`sasl.password`, ...), redacted from everything
    /// librdkafka says at run time.
    secrets: Arc<BTreeMap<String, String>>,
}

impl Auth {
    pub fn for_config(kafka: &KafkaConfig) -> Auth {
        Auth {
            msk_iam: (kafka.auth == KafkaAuth::AwsMskIam)
                .then(|| MskIamSigner::new(&kafka.aws_region)),
            secrets: Arc::new(
                kafka
                    .properties
                    .iter()
                    .filter(|(key, _)| is_secret_property(key))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
        }
    }

    /// `text` with every secret property's value replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        redact_secrets(text, self.secrets.iter())
    }

    /// A line of librdkafka's runtime log, at its level, secrets redacted.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let message = self.redact(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility, "{message}")
            }
        }
    }

    /// A token for the broker (`kafka.auth = "aws-msk-iam"`), or why there is none.
    pub fn token(&self) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        match &self.msk_iam {
            Some(signer) => signer.token(),
            None => Err("the broker asks for an OAUTHBEARER token: set kafka.auth = \"aws-msk-iam\" for AWS MSK, or librdkafka's sasl.oauthbearer.* properties".into()),
        }
    }
}

/// The context of clients that need nothing beyond authentication (`lag`, `check`, `verify`,
/// the read-backs of `restore`).
#[derive(Debug, Clone, Default)]
pub struct AuthContext(pub Auth);

impl ClientContext for AuthContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        self.0.token()
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.0.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.0.redact(reason);
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for AuthContext {}

/// What a producer's broker acknowledged: deliveries and failures, and the first failure.
#[derive(Debug, Default)]
pub struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Deliveries {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn first_error(&self) -> String {
        self.first_error
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_default()
    }
}

/// The context of the producers (`produce`, `restore`): counts what the broker acknowledges and
/// answers token requests.
pub struct ProducerCounting {
    pub deliveries: Arc<Deliveries>,
    pub auth: Auth,
}

impl ClientContext for ProducerCounting {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        self.auth.token()
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.auth.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.auth.redact(reason);
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for ProducerCounting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.deliveries.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, _)) => {
                self.deliveries.failed.fetch_add(1, Ordering::Relaxed);
                self.deliveries
                    .first_error
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// A short-lived consumer that reads metadata, offsets and watermarks (`ClientRole::Inspector`).
pub type Inspector = rdkafka::consumer::BaseConsumer<AuthContext>;

/// Creates an [`Inspector`].
pub fn inspector(kafka: &KafkaConfig) -> rdkafka::error::KafkaResult<Inspector> {
    client_config(kafka, ClientRole::Inspector)
        .create_with_context(AuthContext(Auth::for_config(kafka)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka() -> KafkaConfig {
        let mut kafka = KafkaConfig::default();
        kafka.properties.extend([
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ("queued.min.messages".to_string(), "500".to_string()),
            ("enable.auto.commit".to_string(), "true".to_string()),
        ]);
        kafka
    }

    #[test]
    fn every_role_gets_the_operators_security_settings() {
        for role in [
            ClientRole::Archiver,
            ClientRole::Inspector,
            ClientRole::Producer {
                compression: "zstd",
            },
        ] {
            let client = client_config(&kafka(), role);
            assert_eq!(
                client.get("security.protocol"),
                Some("SASL_SSL"),
                "{role:?}"
            );
            assert_eq!(client.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        }
    }

    #[test]
    fn properties_replace_defaults_but_never_what_a_role_relies_on() {
        let archiver = client_config(&kafka(), ClientRole::Archiver);
        assert_eq!(archiver.get("queued.min.messages"), Some("500"));
        assert_eq!(archiver.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            archiver.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(archiver.get("group.instance.id"), None);

        let inspector = client_config(&kafka(), ClientRole::Inspector);
        assert_eq!(inspector.get("enable.auto.commit"), Some("false"));
        assert_eq!(inspector.get("statistics.interval.ms"), None);

        let producer = client_config(&kafka(), ClientRole::Producer { compression: "lz4" });
        assert_eq!(producer.get("compression.type"), Some("lz4"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("group.id"), None);
    }

    #[test]
    fn msk_iam_auth_is_oauthbearer_over_tls_unless_a_property_says_otherwise() {
        let mut kafka = KafkaConfig {
            auth: KafkaAuth::AwsMskIam,
            ..KafkaConfig::default()
        };
        for role in [ClientRole::Archiver, ClientRole::Inspector] {
            let client = client_config(&kafka, role);
            assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
            assert_eq!(client.get("sasl.mechanism"), Some("OAUTHBEARER"));
        }
        kafka
            .properties
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        let client = client_config(&kafka, ClientRole::Archiver);
        assert_eq!(client.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert!(Auth::for_config(&kafka).msk_iam.is_some());
        // Without it, nothing is added, and a broker asking for a token is told why not.
        let plain = client_config(&KafkaConfig::default(), ClientRole::Archiver);
        assert_eq!(plain.get("sasl.mechanism"), None);
        let Err(err) = Auth::for_config(&KafkaConfig::default()).token() else {
            panic!("a token without kafka.auth");
        };
        assert!(err.to_string().contains("kafka.auth"), "{err}");
    }

    /// librdkafka's runtime log and error callbacks quote what they reject or fail with, SASL
    /// passwords and JAAS configs included: every context redacts them, not only at creation.
    #[test]
    fn every_client_context_redacts_secrets_from_librdkafka_logs_and_errors() {
        let mut kafka = KafkaConfig::default();
        kafka
            .properties
            .insert("sasl.password".into(), "hunter2-secret".into());
        let auth = Auth::for_config(&kafka);
        let logged = captured_logs(|| {
            let inspector = AuthContext(auth.clone());
            inspector.log(
                RDKafkaLogLevel::Error,
                "SASL",
                "auth failed for hunter2-secret",
            );
            inspector.error(
                rdkafka::error::KafkaError::Global(
                    rdkafka::types::RDKafkaErrorCode::Authentication,
                ),
                "bad password hunter2-secret",
            );
            let producer = ProducerCounting {
                deliveries: Arc::default(),
                auth: auth.clone(),
            };
            producer.log(RDKafkaLogLevel::Warning, "SASL", "retrying hunter2-secret");
        });
        assert!(!logged.contains("hunter2-secret"), "{logged}");
        assert_eq!(logged.matches("[redacted]").count(), 3, "{logged}");
    }

    /// What `f` logs through `tracing`, as text.
    fn captured_logs(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = buffer.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }
}
