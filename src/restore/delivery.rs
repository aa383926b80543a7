//! How the restore's producer gives up: never one message at a time, always the whole run.
//!
//! A rerun goes on after the last line of the run in each partition (`position.rs`), which is
//! right only if what reached a partition is a prefix of what was meant for it. librdkafka's
//! idempotent producer keeps that through retries and broker restarts, and with
//! `enable.gapless.guarantee` fails every later message when one fails, except for one case: a
//! message that times out in its queue (`message.timeout.ms`) is dropped, and the messages
//! after it go out once the leader is back — a hole that a rerun steps over. So the producer's
//! messages never time out (`message.timeout.ms = 0`), and the run watches the acknowledgements
//! instead: when the broker acknowledges nothing for the configured timeout while messages
//! wait, the run stops as a whole. Dropping the producer then purges what it still holds, and
//! each partition keeps a prefix; the rerun sends the rest.
//!
//! The rerun finds that prefix's end by reading the target back, which fails when retention or
//! compaction took the run's last messages of a partition: it would send them all again. So the
//! run also keeps, beside its plan, the last position the broker acknowledged in each partition
//! (`{run}.acknowledged.json`, rewritten every few seconds and at the end), and a rerun goes on
//! after the later of the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::OAuthToken;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use super::position::Position;
use super::RestoreError;
use crate::kafka_client::ProducerCounting;

/// Where a message of the run is in a target partition: its position in the plan and its
/// offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AckedAt {
    pub position: Position,
    pub offset: i64,
}

/// What a run keeps beside its plan: per target partition, the last message of the run the
/// broker acknowledged there; and the plan it belongs to (`plan_digest`), so a plan made anew
/// never reads an older plan's positions as its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcknowledgedRecord {
    pub plan: String,
    pub last: HashMap<i32, AckedAt>,
}

/// Names a stored plan by its bytes: SHA-256, the first 16 bytes in hex.
pub fn plan_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    super::position::to_hex(&sha2::Sha256::digest(bytes)[..16])
}

/// The last acknowledged message of the run per partition, as delivery reports come in.
#[derive(Debug, Default)]
pub struct Acknowledged {
    plan: String,
    last: Mutex<HashMap<i32, AckedAt>>,
}

impl Acknowledged {
    /// Starts from what earlier runs of `plan` sent, so a partition this run sends nothing to
    /// keeps it.
    pub fn starting_from(plan: String, last: HashMap<i32, AckedAt>) -> Acknowledged {
        Acknowledged {
            plan,
            last: Mutex::new(last),
        }
    }

    fn note(&self, partition: i32, at: AckedAt) {
        let mut last = self.last.lock().expect("acknowledged lock");
        let entry = last.entry(partition).or_insert(at);
        if at.position > entry.position {
            *entry = at;
        }
    }

    pub fn record(&self) -> AcknowledgedRecord {
        AcknowledgedRecord {
            plan: self.plan.clone(),
            last: self.last.lock().expect("acknowledged lock").clone(),
        }
    }
}

/// The restore's producer context: the producers' counting and authentication, and each
/// acknowledged message's position (the delivery opaque) noted per partition.
pub struct RestoreProducerContext {
    pub counting: ProducerCounting,
    pub acknowledged: Arc<Acknowledged>,
}

impl ClientContext for RestoreProducerContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        self.counting.generate_oauth_token(config)
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.counting.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.counting.error(error, reason);
    }
}

impl ProducerContext for RestoreProducerContext {
    type DeliveryOpaque = Box<Position>;

    fn delivery(&self, result: &DeliveryResult<'_>, position: Box<Position>) {
        if let Ok(message) = result {
            let at = AckedAt {
                position: *position,
                offset: message.offset(),
            };
            self.acknowledged.note(message.partition(), at);
        }
        self.counting.delivery(result, ());
    }
}

/// Reads the delivery timeout the operator configured (`delivery.timeout.ms`, its alias
/// `message.timeout.ms`, or the producers' default), and sets the producer's own to never, so
/// no message of the run times out alone. `None`: wait for the broker however long it takes.
pub fn take_delivery_timeout(client: &mut ClientConfig) -> Result<Option<Duration>, RestoreError> {
    // The defaults set only `message.timeout.ms`: `delivery.timeout.ms`, if present, is the
    // operator's.
    let (key, value) = ["delivery.timeout.ms", "message.timeout.ms"]
        .into_iter()
        .find_map(|key| Some((key, client.get(key)?.to_string())))
        .unwrap_or(("message.timeout.ms", "0".to_string()));
    let millis: u64 = value.trim().parse().map_err(|_| {
        RestoreError::Kafka(format!(
            "kafka.properties.{key}: {value:?} is not a number of milliseconds"
        ))
    })?;
    client.remove("delivery.timeout.ms");
    client.set("message.timeout.ms", "0");
    Ok((millis > 0).then(|| Duration::from_millis(millis)))
}

/// Watches the broker's acknowledgements and says when the run has to stop: messages wait and
/// none was acknowledged for the whole timeout.
#[derive(Debug)]
pub struct AcknowledgementWatch {
    timeout: Option<Duration>,
    /// Acknowledged messages when last seen, and since when that count stands while messages
    /// wait.
    delivered: u64,
    since: Instant,
}

impl AcknowledgementWatch {
    pub fn new(timeout: Option<Duration>, now: Instant) -> AcknowledgementWatch {
        AcknowledgementWatch {
            timeout,
            delivered: 0,
            since: now,
        }
    }

    /// `delivered`: messages acknowledged so far; `waiting`: messages the producer holds that
    /// are not acknowledged yet (queued or in flight); `now`: the clock (a test's own).
    pub fn check(
        &mut self,
        delivered: u64,
        waiting: u64,
        now: Instant,
    ) -> Result<(), RestoreError> {
        if delivered != self.delivered || waiting == 0 {
            self.delivered = delivered;
            self.since = now;
            return Ok(());
        }
        let waited = now.saturating_duration_since(self.since);
        match self.timeout {
            Some(timeout) if waited >= timeout => Err(RestoreError::Unacknowledged {
                waiting,
                seconds: waited.as_secs_f64(),
            }),
            _ => Ok(()),
        }
    }

    /// How long the current count has stood with messages waiting.
    pub fn stalled_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_the_last_acknowledged_position_per_partition_from_where_runs_stood() {
        let at = |object, line, offset| AckedAt {
            position: Position { object, line },
            offset,
        };
        let started = HashMap::from([(0, at(0, 9, 100)), (1, at(0, 4, 50))]);
        let acknowledged = Acknowledged::starting_from("plan-a".into(), started);
        acknowledged.note(1, at(1, 0, 51));
        acknowledged.note(2, at(0, 7, 10));
        acknowledged.note(2, at(0, 3, 8));
        let record = acknowledged.record();
        assert_eq!(record.plan, "plan-a");
        assert_eq!(
            record.last,
            HashMap::from([(0, at(0, 9, 100)), (1, at(1, 0, 51)), (2, at(0, 7, 10))])
        );
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(
            serde_json::from_str::<AcknowledgedRecord>(&json).unwrap(),
            record
        );
    }

    #[test]
    fn the_producer_never_times_a_message_out_and_the_run_keeps_the_operators_timeout() {
        let mut client = ClientConfig::new();
        client.set("message.timeout.ms", "120000");
        assert_eq!(
            take_delivery_timeout(&mut client).unwrap(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(client.get("message.timeout.ms"), Some("0"));

        // The alias is the operator's (the defaults never set it), and goes.
        let mut client = ClientConfig::new();
        client
            .set("message.timeout.ms", "120000")
            .set("delivery.timeout.ms", "5000");
        assert_eq!(
            take_delivery_timeout(&mut client).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(client.get("delivery.timeout.ms"), None);
        assert_eq!(client.get("message.timeout.ms"), Some("0"));

        // 0 is librdkafka's "forever".
        let mut client = ClientConfig::new();
        client.set("message.timeout.ms", "0");
        assert_eq!(take_delivery_timeout(&mut client).unwrap(), None);

        let mut client = ClientConfig::new();
        client.set("message.timeout.ms", "2 minutes");
        let err = take_delivery_timeout(&mut client).unwrap_err().to_string();
        assert!(
            err.contains("message.timeout.ms") && err.contains("2 minutes"),
            "{err}"
        );
    }

    #[test]
    fn the_run_stops_when_nothing_is_acknowledged_for_the_timeout_while_messages_wait() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut watch = AcknowledgementWatch::new(Some(Duration::from_secs(2)), start);
        watch.check(0, 10, at(0)).unwrap();
        // Acknowledgements keep coming: however long the run, it goes on.
        for second in 1..10 {
            watch.check(second * 100, 10, at(second * 1000)).unwrap();
        }
        // They stop while messages wait: fine within the timeout, the end of the run after.
        watch.check(900, 10, at(10_500)).unwrap();
        watch.check(900, 10, at(10_999)).unwrap();
        assert_eq!(watch.stalled_for(at(10_999)), Duration::from_millis(1999));
        let err = watch.check(900, 10, at(11_000)).unwrap_err().to_string();
        assert!(
            err.contains("acknowledged none of the 10 messages") && err.contains("2 s"),
            "{err}"
        );

        // Nothing waiting is not a stall: the sender may spend long on one download.
        let mut watch = AcknowledgementWatch::new(Some(Duration::from_secs(2)), start);
        watch.check(0, 0, at(0)).unwrap();
        watch.check(0, 0, at(60_000)).unwrap();
        watch.check(0, 5, at(60_001)).unwrap();
        watch.check(0, 5, at(61_000)).unwrap();
        assert!(watch.check(0, 5, at(62_001)).is_err());

        // No timeout: the run waits however long it takes.
        let mut watch = AcknowledgementWatch::new(None, start);
        watch.check(0, 5, at(0)).unwrap();
        watch.check(0, 5, at(3_600_000)).unwrap();
    }
}
