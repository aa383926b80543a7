//! Produce: a load generator of realistic Segment-spec events (track, identify, page, screen,
//! group, alias) for demos, tests and benchmarks. Seeded, so the same flags give the same events.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::config::KafkaConfig;
use crate::kafka_client::{client_config, Auth, ClientRole, Deliveries, ProducerCounting};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GeneratorSettings {
    pub sources: usize,
    /// First received-day.
    pub start_day: NaiveDate,
    pub days: u32,
    /// Share of events received within a minute of a UTC midnight, to exercise day cuts.
    pub near_midnight: f64,
    pub seed: u64,
    /// Only the fields routing and tests need (about 200 bytes instead of about 900): for brokers
    /// with small logs, such as librdkafka's mock cluster (5 MB per partition).
    pub minimal: bool,
    /// Grows each event to at least this many bytes with a `padding` property of random
    /// letters (about as compressible as base64): large events for memory benchmarks, or a
    /// small log filled fast enough for retention to delete what the archiver has not read.
    pub pad_bytes: usize,
}

/// Deterministic stream of Segment events.
pub struct EventGenerator {
    settings: GeneratorSettings,
    rng: fastrand::Rng,
    sources: Vec<String>,
    write_keys: Vec<String>,
    sequence: u64,
}

const TRACK_EVENTS: &[&str] = &[
    "Order Completed",
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Signed Up",
    "Video Playback Started",
    "Search Performed",
];
const PAGES: &[(&str, &str)] = &[
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/docs/getting-started", "Getting Started"),
    ("/blog/why-archives-matter", "Why Archives Matter"),
    ("/checkout", "Checkout"),
];
const LIBRARIES: &[(&str, &str)] = &[
    ("analytics.js", "4.1.0"),
    ("analytics-ios", "4.1.8"),
    ("analytics-android", "4.10.4"),
    ("analytics-node", "6.2.0"),
];
const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
];

impl EventGenerator {
    pub fn new(settings: GeneratorSettings) -> EventGenerator {
        // Sources do not depend on the seed: runs with other seeds add events to the same sources,
        // as more traffic from the same customers would.
        let mut naming = fastrand::Rng::with_seed(0x5e6_3e47);
        let sources = (0..settings.sources.max(1))
            .map(|_| alnum(&mut naming, 10))
            .collect();
        let write_keys = (0..settings.sources.max(1))
            .map(|_| alnum(&mut naming, 32))
            .collect();
        let rng = fastrand::Rng::with_seed(settings.seed);
        EventGenerator {
            settings,
            rng,
            sources,
            write_keys,
            sequence: 0,
        }
    }

    /// Source ids (`projectId`s) the generator uses.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// The next event: a partitioning key (the user) and the JSON payload.
    pub fn next_event(&mut self) -> (String, String) {
        self.sequence += 1;
        let rng = &mut self.rng;
        let source = rng.usize(..self.sources.len());
        let received = self.received_at();
        let rng = &mut self.rng;
        let sent = received - chrono::Duration::milliseconds(rng.i64(5..900));
        let user = format!("user-{}", rng.u32(..50_000));
        let anonymous = uuid_like(rng);
        let message_id = format!("{}-{}", uuid_like(rng), self.sequence);
        let (library, version) = LIBRARIES[rng.usize(..LIBRARIES.len())];
        let (path, title) = PAGES[rng.usize(..PAGES.len())];
        let kind = [
            "track", "track", "track", "identify", "page", "screen", "group", "alias",
        ][rng.usize(..8)];
        let time = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        if self.settings.minimal {
            let event = format!(
                r#"{{"messageId":"{message_id}","projectId":"{}","receivedAt":"{}","type":"{kind}","userId":"{user}"}}"#,
                self.sources[source],
                time(received)
            );
            return (user, self.padded(event));
        }
        let mut event = String::with_capacity(1024);
        let _ = write!(
            event,
            r#"{{"anonymousId":"{anonymous}","channel":"client","context":{{"ip":"{}.{}.{}.{}","library":{{"name":"{library}","version":"{version}"}},"locale":"en-US","page":{{"path":"{path}","referrer":"https://www.example.com/","title":"{title}","url":"https://shop.example.com{path}"}},"userAgent":"{}"}},"integrations":{{}},"messageId":"{message_id}","originalTimestamp":"{}","projectId":"{}","receivedAt":"{}","sentAt":"{}","timestamp":"{}","type":"{kind}","userId":"{user}","version":2,"writeKey":"{}""#,
            rng.u8(1..=223),
            rng.u8(..),
            rng.u8(..),
            rng.u8(1..255),
            USER_AGENTS[rng.usize(..USER_AGENTS.len())],
            time(sent),
            self.sources[source],
            time(received),
            time(sent),
            time(sent),
            self.write_keys[source],
        );
        match kind {
            "track" => {
                let _ = write!(
                    event,
                    r#","event":"{}","properties":{{"currency":"USD","order_id":"{}","products":[{{"product_id":"{}","quantity":{},"price":{}.{:02}}}],"revenue":{}.{:02}}}"#,
                    TRACK_EVENTS[rng.usize(..TRACK_EVENTS.len())],
                    alnum(rng, 12),
                    alnum(rng, 8),
                    rng.u8(1..5),
                    rng.u16(1..500),
                    rng.u8(..100),
                    rng.u16(1..2000),
                    rng.u8(..100),
                );
            }
            "identify" => {
                let _ = write!(
                    event,
                    r#","traits":{{"email":"{user}@example.com","name":"User {}","plan":"{}","createdAt":"2024-0{}-1{}T10:00:00.000Z"}}"#,
                    rng.u32(..50_000),
                    ["free", "pro", "enterprise"][rng.usize(..3)],
                    rng.u8(1..10),
                    rng.u8(..10),
                );
            }
            "page" | "screen" => {
                let _ = write!(
                    event,
                    r#","name":"{title}","properties":{{"path":"{path}","title":"{title}","search":""}}"#
                );
            }
            "group" => {
                let _ = write!(
                    event,
                    r#","groupId":"group-{}","traits":{{"name":"Company {}","industry":"Retail","employees":{}}}"#,
                    rng.u32(..2000),
                    rng.u32(..2000),
                    rng.u32(1..10_000),
                );
            }
            _ => {
                let _ = write!(event, r#","previousId":"{anonymous}""#);
            }
        }
        event.push('}');
        (user, self.padded(event))
    }

    /// `event` with a `padding` field that makes it `pad_bytes` long, if it is shorter.
    fn padded(&mut self, mut event: String) -> String {
        const FIELD: &str = r#","padding":""#;
        if self.settings.pad_bytes > event.len() {
            let letters = self
                .settings
                .pad_bytes
                .saturating_sub(event.len() + FIELD.len() + 1);
            event.pop();
            event.push_str(FIELD);
            event.push_str(&alnum(&mut self.rng, letters));
            event.push_str("\"}");
        }
        event
    }

    fn received_at(&mut self) -> DateTime<Utc> {
        let rng = &mut self.rng;
        let start = Utc.from_utc_datetime(
            &self
                .settings
                .start_day
                .and_hms_opt(0, 0, 0)
                .expect("midnight"),
        );
        let span_ms = i64::from(self.settings.days.max(1)) * 86_400_000;
        let offset_ms = if self.settings.days > 1 && rng.f64() < self.settings.near_midnight {
            // Within a minute either side of an inner midnight.
            let midnight = i64::from(rng.u32(1..self.settings.days)) * 86_400_000;
            midnight + rng.i64(-60_000..60_000)
        } else {
            rng.i64(0..span_ms)
        };
        start + chrono::Duration::milliseconds(offset_ms)
    }
}

fn alnum(rng: &mut fastrand::Rng, len: usize) -> String {
    (0..len).map(|_| rng.alphanumeric()).collect()
}

fn uuid_like(rng: &mut fastrand::Rng) -> String {
    let v = rng.u128(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (v >> 96) as u32,
        (v >> 80) as u16,
        (v >> 68) as u16 & 0xfff,
        (v >> 52) as u16,
        v as u64 & 0xffff_ffff_ffff
    )
}

/// Where and how fast to produce.
#[derive(Debug, Clone)]
pub struct ProduceSettings {
    /// Brokers, topic and security settings, as the archiver reads them.
    pub kafka: KafkaConfig,
    pub count: u64,
    /// Events per second; 0 for as fast as the broker takes them.
    pub rate: u64,
    /// librdkafka's `compression.type` for the produced batches.
    pub compression: String,
    /// Every event to this partition; `None`: the producer's partitioner, by user.
    pub partition: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot create the kafka producer: {0}")]
    Create(String),
    #[error("{failed} of {total} events were not delivered; first error: {first}")]
    Delivery {
        failed: u64,
        total: u64,
        first: String,
    },
    #[error("producing failed: {0}")]
    Send(#[source] KafkaError),
}

/// Summary of a produce run.
#[derive(Debug, Clone)]
pub struct ProduceSummary {
    pub events: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Produces `settings.count` events and waits until the broker acknowledged every one.
pub fn produce(
    settings: &ProduceSettings,
    generator: &mut EventGenerator,
    mut progress: impl FnMut(u64, u64),
) -> Result<ProduceSummary, ProduceError> {
    let counter = Arc::new(Deliveries::default());
    let producer: ThreadedProducer<ProducerCounting> = client_config(
        &settings.kafka,
        ClientRole::Producer {
            compression: &settings.compression,
        },
    )
    .create_with_context(ProducerCounting {
        deliveries: Arc::clone(&counter),
        auth: Auth::for_config(&settings.kafka),
    })
    .map_err(|err| {
        ProduceError::Create(crate::config::redact_secrets(
            &err.to_string(),
            &settings.kafka.properties,
        ))
    })?;

    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut bytes = 0u64;
    for sent in 0..settings.count {
        if settings.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / settings.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (key, payload) = generator.next_event();
        bytes += payload.len() as u64;
        let mut record = BaseRecord::to(&settings.kafka.topic)
            .key(&key)
            .payload(&payload);
        if let Some(partition) = settings.partition {
            record = record.partition(partition);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((err, _)) => return Err(ProduceError::Send(err)),
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(sent + 1, counter.delivered());
            last_report = Instant::now();
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(ProduceError::Send)?;
    let failed = counter.failed();
    if failed > 0 {
        return Err(ProduceError::Delivery {
            failed,
            total: settings.count,
            first: counter.first_error(),
        });
    }
    Ok(ProduceSummary {
        events: settings.count,
        bytes,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingConfig;
    use crate::layout::Destination;
    use crate::pipeline::Record;
    use crate::route::Router;

    fn generator(seed: u64) -> EventGenerator {
        EventGenerator::new(GeneratorSettings {
            sources: 5,
            start_day: NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(),
            days: 3,
            near_midnight: 0.2,
            seed,
            minimal: false,
            pad_bytes: 0,
        })
    }

    #[test]
    fn events_are_valid_segment_json_and_route_as_events() {
        let mut generator = generator(1);
        let router = Router::new(&RoutingConfig::default(), "t", 0);
        let mut days = std::collections::BTreeSet::new();
        let mut kinds = std::collections::BTreeSet::new();
        let mut ids = std::collections::HashSet::new();
        for offset in 0..2000 {
            let (_, payload) = generator.next_event();
            let value: serde_json::Value = serde_json::from_str(&payload).unwrap();
            kinds.insert(value["type"].as_str().unwrap().to_string());
            assert!(ids.insert(value["messageId"].as_str().unwrap().to_string()));
            let record = Record {
                offset,
                timestamp_ms: None,
                key: None,
                payload: Some(payload.into_bytes()),
                headers: vec![],
            };
            match router.route(&record).destination {
                Destination::Events { day, .. } => {
                    days.insert(day);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(days.len(), 3);
        assert_eq!(kinds.len(), 6, "{kinds:?}");
    }

    #[test]
    fn padded_events_are_as_long_as_asked_and_still_valid() {
        let mut generator = EventGenerator::new(GeneratorSettings {
            minimal: true,
            pad_bytes: 4096,
            ..generator(3).settings
        });
        for _ in 0..50 {
            let (_, payload) = generator.next_event();
            assert_eq!(payload.len(), 4096);
            let value: serde_json::Value = serde_json::from_str(&payload).unwrap();
            assert!(value["padding"].as_str().unwrap().len() > 3800);
            assert!(value["messageId"].is_string());
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let (mut a, mut b) = (generator(9), generator(9));
        for _ in 0..100 {
            assert_eq!(a.next_event(), b.next_event());
        }
        assert_ne!(generator(9).next_event(), generator(10).next_event());
    }
}
