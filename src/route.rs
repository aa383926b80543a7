//! Route: decides where one Kafka record goes — the `(source-id, received-day)` file of an event,
//! or the dead letter with a bounded reason — and produces the exact line to store.
//!
//! This is a pure function of the record, the routing config and the routing code version.
//! Replaying the same offsets therefore produces the same files and keys, which the exactly-once
//! protocol relies on. A change here that routes some record elsewhere or writes another line
//! for it must bump [`crate::rules::ROUTING_CODE_VERSION`] and keep the earlier behaviour for
//! routers of the earlier versions: a member replays a batch an earlier release began with that
//! release's routing (`Router::with_code`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::RoutingConfig;
use crate::index::IdKeys;
use crate::layout::{check_source_id, DayFormat, Destination, SourceRule};
use crate::pipeline::Record;
use crate::suppress::Suppression;

/// Why a record went to the dead letter. The set is closed so the metric label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    Tombstone,
    Empty,
    TooLarge,
    NotUtf8,
    NulByte,
    NotJson,
    NotObject,
    TooDeep,
    NoSource,
    BadSourceId,
    NoReceivedAt,
    BadReceivedAt,
    /// A header key that is not UTF-8: legal on the wire, but no reader of the archive (nor the
    /// dead letter's own `key`) can name it, so the record is kept whole, key in base64.
    BadHeader,
    /// A source id `routing.allowed_sources` does not list.
    SourceNotAllowed,
    /// A `receivedAt` further from the Kafka timestamp than `routing.received_at_window_days`.
    ReceivedAtOutsideWindow,
    /// A routing field (the received-at field, a source field) given twice at the top level:
    /// readers disagree on which counts (routing code 2 on).
    DuplicateKey,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 16] = [
        DeadLetterReason::Tombstone,
        DeadLetterReason::Empty,
        DeadLetterReason::TooLarge,
        DeadLetterReason::NotUtf8,
        DeadLetterReason::NulByte,
        DeadLetterReason::NotJson,
        DeadLetterReason::NotObject,
        DeadLetterReason::TooDeep,
        DeadLetterReason::NoSource,
        DeadLetterReason::BadSourceId,
        DeadLetterReason::NoReceivedAt,
        DeadLetterReason::BadReceivedAt,
        DeadLetterReason::BadHeader,
        DeadLetterReason::SourceNotAllowed,
        DeadLetterReason::ReceivedAtOutsideWindow,
        DeadLetterReason::DuplicateKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Tombstone => "tombstone",
            DeadLetterReason::Empty => "empty",
            DeadLetterReason::TooLarge => "too-large",
            DeadLetterReason::NotUtf8 => "not-utf8",
            DeadLetterReason::NulByte => "nul-byte",
            DeadLetterReason::NotJson => "not-json",
            DeadLetterReason::NotObject => "not-object",
            DeadLetterReason::TooDeep => "too-deep",
            DeadLetterReason::NoSource => "no-source",
            DeadLetterReason::BadSourceId => "bad-source-id",
            DeadLetterReason::NoReceivedAt => "no-received-at",
            DeadLetterReason::BadReceivedAt => "bad-received-at",
            DeadLetterReason::BadHeader => "bad-header",
            DeadLetterReason::SourceNotAllowed => "source-not-allowed",
            DeadLetterReason::ReceivedAtOutsideWindow => "received-at-outside-window",
            DeadLetterReason::DuplicateKey => "duplicate-key",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of routing one record.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    pub destination: Destination,
    /// The bytes of the line to store, without the trailing newline.
    pub line: Cow<'a, [u8]>,
    pub dead_letter: Option<DeadLetterReason>,
    /// Its `userId` or `anonymousId` is on the router's suppression list: the record is not
    /// archived (its offset is recorded as a `suppressed` gap).
    pub suppressed: bool,
    /// The routing keys of the ids it names, for its file's id filter (`crate::index`); none
    /// when the router builds no index.
    pub ids: IdKeys,
}

/// Bytes of a `too-large` record's payload its dead letter keeps (routing code 2 on), beside
/// the SHA-256 of all of it.
pub const TOO_LARGE_KEPT_BYTES: usize = 64 << 10;

/// The prepared routing rules; built once from the config.
#[derive(Debug, Clone)]
pub struct Router {
    /// The routing code version this router routes as (`rules::ROUTING_CODE_VERSION` unless
    /// it replays a batch an earlier release began).
    code: u32,
    topic: String,
    partition: i32,
    rules: Vec<SourceRule>,
    write_keys: std::collections::BTreeMap<String, String>,
    received_at_field: String,
    fallback_to_kafka_timestamp: bool,
    day_format: DayFormat,
    max_message_bytes: usize,
    max_json_depth: usize,
    /// `routing.allowed_sources`: empty allows every source.
    allowed_sources: std::collections::HashSet<String>,
    /// `routing.received_at_window_days`, in days.
    received_at_window: Option<i64>,
    /// Top-level JSON fields the rules read, received-at first.
    wanted_fields: Vec<String>,
    /// The users whose events are not archived (part of the cutting rules), with where their
    /// id fields ([`crate::suppress::ID_FIELDS`]) are in `wanted_fields`.
    suppression: Option<(Arc<Suppression>, Vec<usize>)>,
    /// Collect each record's ids for the id index (`output.id_index`); never changes where a
    /// record goes.
    index: bool,
}

impl Router {
    /// Routes as this release routes new batches.
    pub fn new(config: &RoutingConfig, topic: &str, partition: i32) -> Router {
        Router::with_code(config, crate::rules::ROUTING_CODE_VERSION, topic, partition)
    }

    /// Routes as routing code version `code` did (one `rules::CuttingRules::parse_reproducible`
    /// accepts).
    pub fn with_code(config: &RoutingConfig, code: u32, topic: &str, partition: i32) -> Router {
        let rules = config.source.clone();
        let mut wanted_fields = vec![config.received_at_field.clone()];
        for rule in &rules {
            if let SourceRule::Field(name) | SourceRule::WriteKey(name) = rule {
                if !wanted_fields.contains(name) {
                    wanted_fields.push(name.clone());
                }
            }
        }
        Router {
            code,
            topic: topic.to_string(),
            partition,
            rules,
            write_keys: config.write_keys.clone(),
            received_at_field: config.received_at_field.clone(),
            fallback_to_kafka_timestamp: config.fallback_to_kafka_timestamp,
            day_format: config.day_format,
            max_message_bytes: config.max_message_bytes,
            max_json_depth: config.max_json_depth,
            allowed_sources: config.allowed_sources.iter().cloned().collect(),
            received_at_window: config.received_at_window_days.map(i64::from),
            wanted_fields,
            suppression: None,
            index: false,
        }
    }

    /// The router that also reads each record's ids for the id index.
    pub fn with_index(mut self, index: bool) -> Router {
        self.index = index;
        self
    }

    /// The router that also leaves out the events of the users on `list` (`None`, or an empty
    /// list: none).
    pub fn with_suppression(mut self, list: Option<Arc<Suppression>>) -> Router {
        self.suppression = list.filter(|list| !list.is_empty()).map(|list| {
            let indices = crate::suppress::ID_FIELDS
                .iter()
                .map(
                    |field| match self.wanted_fields.iter().position(|w| w == field) {
                        Some(index) => index,
                        None => {
                            self.wanted_fields.push(field.to_string());
                            self.wanted_fields.len() - 1
                        }
                    },
                )
                .collect();
            (list, indices)
        });
        self
    }

    /// The suppression list it routes with, if any.
    pub fn suppression(&self) -> Option<&Arc<Suppression>> {
        self.suppression.as_ref().map(|(list, _)| list)
    }

    /// Routes one record. Never fails: what cannot be archived as an event is a dead letter.
    pub fn route<'a>(&self, record: &'a Record) -> Routed<'a> {
        let mut suppressed = false;
        let mut ids = IdKeys::default();
        let routed = self.route_event(record, &mut suppressed, &mut ids);
        if let Err(reason) = &routed {
            // A dead letter (rare) is read again, once, for what needs its record's ids: the
            // index, and the list when its fields were not read (a duplicated id among them).
            // Its key counts too: often the user's id (the partitioning key).
            let key = record
                .key
                .as_deref()
                .and_then(|key| std::str::from_utf8(key).ok());
            let checks_list = self.suppression.is_some() && !suppressed;
            let letter_ids = match (reason, record.payload.as_deref()) {
                // Read again only when that is cheap: a too-large payload is not.
                (DeadLetterReason::TooLarge, _) | (_, None) => Vec::new(),
                (_, Some(payload)) if self.index || checks_list => {
                    crate::suppress::top_level_ids(payload)
                }
                _ => Vec::new(),
            };
            if self.index {
                let too_large = record
                    .payload
                    .as_ref()
                    .is_some_and(|payload| payload.len() > self.max_message_bytes);
                // Too large to read again: its file is read whole by `forget`.
                ids = if too_large {
                    IdKeys::unknown()
                } else {
                    IdKeys::default()
                };
                for id in letter_ids.iter().map(String::as_str).chain(key) {
                    ids.push(id);
                }
            }
            if let (Some((list, _)), true) = (&self.suppression, checks_list) {
                suppressed = key
                    .into_iter()
                    .chain(letter_ids.iter().map(String::as_str))
                    .any(|id| list.matches(id));
            }
        }
        match routed {
            Ok((destination, line)) => Routed {
                destination,
                line,
                dead_letter: None,
                suppressed,
                ids,
            },
            Err(reason) => Routed {
                destination: Destination::DeadLetter {
                    day: record
                        .timestamp_ms
                        .and_then(DateTime::<Utc>::from_timestamp_millis)
                        .map_or_else(
                            || crate::layout::UNDATED_DAY.into(),
                            |t| self.day_format.format(t.date_naive()),
                        ),
                },
                line: Cow::Owned(self.dead_letter_line(record, reason)),
                dead_letter: Some(reason),
                suppressed,
                ids,
            },
        }
    }

    /// The record's file and line; sets `suppressed` as soon as its fields are read (a dead
    /// letter for a later reason is suppressed too: it holds the user's event).
    fn route_event<'a>(
        &self,
        record: &'a Record,
        suppressed: &mut bool,
        ids: &mut IdKeys,
    ) -> Result<(Destination, Cow<'a, [u8]>), DeadLetterReason> {
        // Before this reason existed such a record stopped the poll loop (rdkafka panicked on
        // the key), so no batch was ever cut otherwise and the routing code version stands.
        if record
            .headers
            .iter()
            .any(|(key, _)| std::str::from_utf8(key).is_err())
        {
            return Err(DeadLetterReason::BadHeader);
        }
        let payload = record
            .payload
            .as_deref()
            .ok_or(DeadLetterReason::Tombstone)?;
        if payload.is_empty() {
            return Err(DeadLetterReason::Empty);
        }
        if payload.len() > self.max_message_bytes {
            return Err(DeadLetterReason::TooLarge);
        }
        if std::str::from_utf8(payload).is_err() {
            return Err(DeadLetterReason::NotUtf8);
        }
        let scan = RawScan::of(payload);
        if scan.nul {
            return Err(DeadLetterReason::NulByte);
        }
        if scan.depth > self.max_json_depth {
            return Err(DeadLetterReason::TooDeep);
        }
        // Routing code 1 took the first of a duplicated routing field.
        let duplicates = if self.code >= 2 {
            Duplicates::DeadLetter
        } else {
            Duplicates::FirstWins
        };
        let fields = extract_fields(
            payload,
            &self.wanted_fields,
            duplicates,
            self.index.then_some(ids),
        )?;
        if let Some((list, indices)) = &self.suppression {
            // With the index on, every value of an id field is among the keys it read: an event
            // none of whose keys may be listed (nearly all) is ruled out without hashing its ids
            // again; the others are settled as without the index.
            let may_be_listed = !self.index
                || !ids.is_complete()
                || ids.keys().iter().any(|&key| list.may_hold_key(key));
            *suppressed = may_be_listed
                && indices.iter().any(|&index| match &fields[index] {
                    Some(FieldValue::Str(id)) => list.matches(id),
                    Some(FieldValue::Integer(id)) => list.matches(&id.to_string()),
                    _ => false,
                });
        }

        let source = self.source_of(record, &fields)?;
        if !self.allowed_sources.is_empty() && !self.allowed_sources.contains(&source) {
            return Err(DeadLetterReason::SourceNotAllowed);
        }
        let day = match &fields[0] {
            Some(FieldValue::Str(text)) => match DateTime::parse_from_rfc3339(text) {
                Ok(time) => Ok(time.with_timezone(&Utc).date_naive()),
                Err(_) => Err(DeadLetterReason::BadReceivedAt),
            },
            Some(FieldValue::Other | FieldValue::Integer(_)) => {
                Err(DeadLetterReason::BadReceivedAt)
            }
            None => Err(DeadLetterReason::NoReceivedAt),
        };
        let day = match day {
            Ok(day) => {
                self.check_window(record, day)?;
                day
            }
            Err(reason) if self.fallback_to_kafka_timestamp => record
                .timestamp_ms
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .map(|t| t.date_naive())
                .ok_or(reason)?,
            Err(reason) => return Err(reason),
        };

        // A raw line break can only be insignificant whitespace in valid JSON (inside strings it
        // must be escaped), so dropping it puts the event on one line without changing it.
        let line = if scan.line_break {
            Cow::Owned(
                payload
                    .iter()
                    .copied()
                    .filter(|&b| b != b'\n' && b != b'\r')
                    .collect(),
            )
        } else {
            Cow::Borrowed(payload)
        };
        Ok((
            Destination::Events {
                source,
                day: self.day_format.format(day),
            },
            line,
        ))
    }

    /// A `receivedAt` day within the window around the record's Kafka timestamp (when both are
    /// set; the day from the timestamp itself is never checked).
    fn check_window(&self, record: &Record, day: NaiveDate) -> Result<(), DeadLetterReason> {
        let (Some(window), Some(kafka_day)) = (
            self.received_at_window,
            record
                .timestamp_ms
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .map(|t| t.date_naive()),
        ) else {
            return Ok(());
        };
        if (day - kafka_day).num_days().abs() > window {
            return Err(DeadLetterReason::ReceivedAtOutsideWindow);
        }
        Ok(())
    }

    fn source_of(
        &self,
        record: &Record,
        fields: &[Option<FieldValue<'_>>],
    ) -> Result<String, DeadLetterReason> {
        let field = |name: &str| -> Option<&FieldValue<'_>> {
            let index = self.wanted_fields.iter().position(|f| f == name)?;
            fields[index].as_ref()
        };
        for rule in &self.rules {
            let candidate: Option<Cow<'_, str>> = match rule {
                SourceRule::Header(name) => record
                    .headers
                    .iter()
                    .find(|(key, _)| key == name.as_bytes())
                    .and_then(|(_, value)| value.as_deref())
                    .map(|bytes| {
                        std::str::from_utf8(bytes)
                            .map(Cow::Borrowed)
                            .map_err(|_| DeadLetterReason::BadSourceId)
                    })
                    .transpose()?,
                SourceRule::Field(name) => match field(name) {
                    Some(FieldValue::Str(text)) => Some(Cow::Borrowed(text.as_ref())),
                    Some(FieldValue::Other | FieldValue::Integer(_)) => {
                        return Err(DeadLetterReason::BadSourceId)
                    }
                    None => None,
                },
                SourceRule::WriteKey(name) => match field(name) {
                    Some(FieldValue::Str(text)) => self
                        .write_keys
                        .get(text.as_ref())
                        .map(|s| Cow::Borrowed(s.as_str())),
                    _ => None,
                },
                SourceRule::Static(id) => Some(Cow::Borrowed(id.as_str())),
            };
            if let Some(source) = candidate {
                if source.is_empty() {
                    continue;
                }
                check_source_id(&source).map_err(|_| DeadLetterReason::BadSourceId)?;
                return Ok(source.into_owned());
            }
        }
        Err(DeadLetterReason::NoSource)
    }

    /// The dead-letter line: everything needed to inspect or replay the record by hand.
    fn dead_letter_line(&self, record: &Record, reason: DeadLetterReason) -> Vec<u8> {
        #[derive(Serialize)]
        struct Header<'a> {
            /// The key, when it is UTF-8 (so dead letters of every other reason read as before).
            #[serde(skip_serializing_if = "Option::is_none")]
            key: Option<&'a str>,
            /// The key's bytes otherwise (`bad-header`).
            #[serde(skip_serializing_if = "Option::is_none")]
            key_base64: Option<String>,
            value_base64: Option<String>,
        }
        #[derive(Serialize)]
        struct DeadLetter<'a> {
            topic: &'a str,
            partition: i32,
            offset: i64,
            timestamp_ms: Option<i64>,
            reason: &'static str,
            key_base64: Option<String>,
            headers: Vec<Header<'a>>,
            payload_base64: Option<String>,
            payload_bytes: usize,
            /// A `too-large` letter keeps a prefix of the payload (routing code 2 on).
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            payload_truncated: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_sha256: Option<String>,
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let truncated = reason == DeadLetterReason::TooLarge && self.code >= 2;
        let kept = record.payload.as_deref().map(|payload| {
            if truncated {
                &payload[..payload.len().min(TOO_LARGE_KEPT_BYTES)]
            } else {
                payload
            }
        });
        let letter = DeadLetter {
            topic: &self.topic,
            partition: self.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            reason: reason.as_str(),
            key_base64: record.key.as_deref().map(b64),
            headers: record
                .headers
                .iter()
                .map(|(key, value)| {
                    let text = std::str::from_utf8(key).ok();
                    Header {
                        key: text,
                        key_base64: text.is_none().then(|| b64(key)),
                        value_base64: value.as_deref().map(b64),
                    }
                })
                .collect(),
            payload_base64: kept.map(b64),
            payload_bytes: record.payload.as_ref().map_or(0, Vec::len),
            payload_truncated: truncated,
            payload_sha256: record
                .payload
                .as_deref()
                .filter(|_| truncated)
                .map(|payload| {
                    use sha2::Digest as _;
                    let digest = sha2::Sha256::digest(payload);
                    digest.iter().map(|b| format!("{b:02x}")).collect()
                }),
        };
        serde_json::to_vec(&letter).expect("dead letter serializes")
    }

    /// Reason label of the received-at field, for messages naming it.
    pub fn received_at_field(&self) -> &str {
        &self.received_at_field
    }
}

/// What routing needs to know of the raw bytes before parsing them.
struct RawScan {
    nul: bool,
    /// A raw `\n` or `\r` anywhere: the line must drop them to stay one line.
    line_break: bool,
    /// The deepest nesting of objects and arrays. Known before parsing, so that no parser
    /// recursion depends on untrusted input.
    depth: usize,
}

impl RawScan {
    fn of(payload: &[u8]) -> RawScan {
        RawScan {
            nul: memchr::memchr(0, payload).is_some(),
            line_break: memchr::memchr2(b'\n', b'\r', payload).is_some(),
            depth: nesting_depth(payload),
        }
    }
}

/// The deepest nesting of objects and arrays, counting only brackets outside strings. Strings,
/// most of an event's bytes, are skipped to their next quote or backslash with `memchr` rather
/// than walked byte by byte (that walk was the largest cost of routing after the parse).
fn nesting_depth(payload: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut at = 0;
    while at < payload.len() {
        match payload[at] {
            b'"' => {
                at += 1;
                loop {
                    let Some(found) = memchr::memchr2(b'"', b'\\', &payload[at..]) else {
                        // An unterminated string: everything left is inside it.
                        return deepest;
                    };
                    if payload[at + found] == b'"' {
                        at += found + 1;
                        break;
                    }
                    // A backslash escapes the byte after it, whatever it is.
                    at += found + 2;
                    if at >= payload.len() {
                        return deepest;
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    deepest
}

/// A top-level field's value as far as routing cares.
#[derive(Debug)]
enum FieldValue<'a> {
    Str(Cow<'a, str>),
    /// A whole number: routing treats it as any other non-string, suppression as its digits
    /// (a `userId` producers send as a number).
    Integer(i128),
    Other,
}

/// What a wanted field given twice at the top level means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Duplicates {
    /// Routing code 1: the first counts.
    FirstWins,
    /// Routing code 2 on: the record is a `duplicate-key` dead letter.
    DeadLetter,
}

/// Validates `payload` as one JSON object and pulls out the wanted top-level fields, without
/// building a tree of the rest.
/// With `ids`, also every top-level id field's value ([`crate::suppress::ID_FIELDS`]), each
/// occurrence, whatever the wanted fields: the index never changes how a record is cut.
fn extract_fields<'a>(
    payload: &'a [u8],
    wanted: &[String],
    duplicates: Duplicates,
    ids: Option<&mut IdKeys>,
) -> Result<Vec<Option<FieldValue<'a>>>, DeadLetterReason> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let result = ObjectFields {
        wanted,
        duplicates,
        ids,
    }
    .deserialize(&mut deserializer);
    let classify = |err: serde_json::Error| {
        if err.to_string().starts_with("recursion limit exceeded") {
            DeadLetterReason::TooDeep
        } else if err.to_string().starts_with(NOT_AN_OBJECT) {
            DeadLetterReason::NotObject
        } else if err.to_string().starts_with(DUPLICATE_KEY) {
            DeadLetterReason::DuplicateKey
        } else {
            DeadLetterReason::NotJson
        }
    };
    let fields = result.map_err(classify)?;
    deserializer.end().map_err(|_| DeadLetterReason::NotJson)?;
    Ok(fields)
}

const NOT_AN_OBJECT: &str = "not an object";
const DUPLICATE_KEY: &str = "duplicate routing field";

struct ObjectFields<'w> {
    wanted: &'w [String],
    duplicates: Duplicates,
    ids: Option<&'w mut IdKeys>,
}

impl<'de> DeserializeSeed<'de> for ObjectFields<'_> {
    type Value = Vec<Option<FieldValue<'de>>>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectFields<'_> {
    type Value = Vec<Option<FieldValue<'de>>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Vec<Option<FieldValue<'de>>> = self.wanted.iter().map(|_| None).collect();
        let (wanted, indexing) = (self.wanted, self.ids.is_some());
        let seed = || WantedKey {
            wanted,
            ids: indexing,
        };
        while let Some(key) = map.next_key_seed(seed())? {
            match key.wanted {
                Some(index) if found[index].is_none() => {
                    let value = map.next_value::<FieldValueSeed>()?.0;
                    if let (true, Some(ids)) = (key.id, self.ids.as_deref_mut()) {
                        value.add_id_to(ids);
                    }
                    found[index] = Some(value);
                }
                Some(_) if self.duplicates == Duplicates::DeadLetter => {
                    return Err(de::Error::custom(DUPLICATE_KEY));
                }
                _ if key.id => {
                    let value = map.next_value::<FieldValueSeed>()?.0;
                    if let Some(ids) = self.ids.as_deref_mut() {
                        value.add_id_to(ids);
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Err(de::Error::custom(NOT_AN_OBJECT))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
}

/// Reads an object's key and answers which wanted field it names, if any, and whether it is
/// an id field the index wants, without allocating it (serde's `Cow<str>` key is always an
/// owned copy: a dozen small allocations an event).
struct WantedKey<'w> {
    wanted: &'w [String],
    ids: bool,
}

/// What a key names.
struct KeyNames {
    wanted: Option<usize>,
    id: bool,
}

impl<'de> DeserializeSeed<'de> for WantedKey<'_> {
    type Value = KeyNames;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for WantedKey<'_> {
    type Value = KeyNames;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(KeyNames {
            wanted: self.wanted.iter().position(|wanted| wanted == key),
            id: self.ids && crate::suppress::ID_FIELDS.contains(&key),
        })
    }
}

impl FieldValue<'_> {
    /// Adds the id this value of an id field is, as suppression reads it (a string, or a
    /// whole number as its digits), to `ids`.
    fn add_id_to(&self, ids: &mut IdKeys) {
        match self {
            FieldValue::Str(id) => ids.push(id),
            FieldValue::Integer(id) => ids.push(&id.to_string()),
            FieldValue::Other => {}
        }
    }
}

/// Reads a field value: keeps strings (borrowed when unescaped), skips anything else.
struct FieldValueSeed<'de>(FieldValue<'de>);

impl<'de> Deserialize<'de> for FieldValueSeed<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValueSeed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Str(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Str(Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Other))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Integer(v.into())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Integer(v.into())))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Other))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(FieldValueSeed(FieldValue::Other))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FieldValueSeed(FieldValue::Other))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FieldValueSeed(FieldValue::Other))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn record(payload: &[u8]) -> Record {
        Record {
            offset: 7,
            timestamp_ms: Some(1_432_684_800_123),
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: vec![],
        }
    }

    fn router() -> Router {
        Router::new(&RoutingConfig::default(), "events", 3)
    }

    /// A `receivedAt` before 1970 is implausible (Segment stamps it on arrival), but it is what
    /// the event says and routing never guesses: it is archived under its day, a negative
    /// epoch-ms folder, which `restore` and the Athena projection range (from 2015) treat as
    /// any other folder (README, "Reading the data").
    #[test]
    fn a_received_day_before_1970_is_filed_under_its_own_day() {
        let payload = br#"{"type":"track","projectId":"src1","receivedAt":"1969-12-31T10:00:00Z"}"#;
        let day = |format| {
            let config = RoutingConfig {
                day_format: format,
                ..RoutingConfig::default()
            };
            match Router::new(&config, "events", 3)
                .route(&record(payload))
                .destination
            {
                Destination::Events { day, .. } => day,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(day(DayFormat::EpochMs), "-86400000");
        assert_eq!(day(DayFormat::Date), "1969-12-31");
        assert_eq!(day(DayFormat::Hive), "day=1969-12-31");
        assert_eq!(
            crate::restore::plan::parse_day("-86400000"),
            chrono::NaiveDate::from_ymd_opt(1969, 12, 31)
        );
    }

    /// The index reads every id of a record, as `forget` matches them, and changes nothing
    /// else about how it is routed.
    #[test]
    fn the_index_reads_each_records_ids_and_routes_as_without_it() {
        use crate::suppress::key_of;
        let plain = router();
        let indexed = router().with_index(true);
        let payloads: [&[u8]; 7] = [
            br#"{"projectId":"p","receivedAt":"2015-05-27T00:00:00Z","userId":"u1","anonymousId":"a1"}"#,
            br#"{"projectId":"p","receivedAt":"2015-05-27T00:00:00Z","userId":7,"userId":"u\u0032"}"#,
            br#"{"projectId":"p","receivedAt":"2015-05-27T00:00:00Z","userId":{"x":1}}"#,
            br#"{"projectId":"p","projectId":"q","receivedAt":"2015-05-27T00:00:00Z","userId":"u3"}"#,
            br#"{"receivedAt":"2015-05-27T00:00:00Z","userId":"u4"}"#,
            b"not json",
            br#"{"projectId":"p","receivedAt":"2015-05-27T00:00:00Z"}"#,
        ];
        let keys = |ids: &[&str]| ids.iter().map(|id| key_of(id)).collect::<Vec<_>>();
        let expected: [Vec<u64>; 7] = [
            keys(&["u1", "a1"]),
            keys(&["7", "u2"]),
            keys(&[]),
            // Dead letters (a duplicated routing field, no source): their record's ids and key.
            keys(&["u3", "k"]),
            keys(&["u4", "k"]),
            keys(&["k"]),
            keys(&[]),
        ];
        for (payload, expected) in payloads.iter().zip(expected) {
            let record = record(payload);
            let (with, without) = (indexed.route(&record), plain.route(&record));
            assert_eq!(
                with.ids.keys(),
                expected,
                "{}",
                String::from_utf8_lossy(payload)
            );
            assert!(with.ids.is_complete());
            assert_eq!(
                (
                    &with.destination,
                    &with.line,
                    with.dead_letter,
                    with.suppressed
                ),
                (
                    &without.destination,
                    &without.line,
                    without.dead_letter,
                    without.suppressed
                )
            );
            assert!(without.ids.keys().is_empty());
        }
    }

    /// With the id index on, the list is first checked against the keys the index read: the
    /// same events are left out either way.
    #[test]
    fn events_of_suppressed_users_are_left_out_by_either_id_whatever_else_they_are() {
        for index in [false, true] {
            suppressed_users_are_left_out(index);
        }
    }

    fn suppressed_users_are_left_out(index: bool) {
        use crate::suppress::hash_id;
        let list = Arc::new(Suppression::new([hash_id("u-gone"), hash_id("a-gone")]));
        let router = router().with_suppression(Some(list)).with_index(index);
        let suppressed = |payload: &[u8]| router.route(&record(payload)).suppressed;
        let event = |ids: &str| {
            format!(r#"{{"projectId":"src1","receivedAt":"2015-05-27T10:00:00Z"{ids}}}"#)
        };
        assert!(suppressed(event(r#","userId":"u-gone""#).as_bytes()));
        assert!(suppressed(
            event(r#","userId":"u-kept","anonymousId":"a-gone""#).as_bytes()
        ));
        assert!(
            suppressed(event(r#","userId":"u\u002dgone""#).as_bytes()),
            "escaped"
        );
        assert!(!suppressed(event(r#","userId":"u-kept""#).as_bytes()));
        assert!(!suppressed(
            event(r#","properties":{"userId":"u-gone"}"#).as_bytes()
        ));
        // A dead letter holding a suppressed user's event is left out too.
        let no_day = record(br#"{"projectId":"src1","userId":"u-gone"}"#);
        let no_day = router.route(&no_day);
        assert_eq!(
            (no_day.dead_letter, no_day.suppressed),
            (Some(DeadLetterReason::NoReceivedAt), true)
        );
        // A number is matched by its digits.
        let numeric = Router::new(&RoutingConfig::default(), "events", 3)
            .with_suppression(Some(Arc::new(Suppression::new([hash_id("12345")]))))
            .with_index(index);
        let number = record(event(r#","userId":12345"#).as_bytes());
        assert!(numeric.route(&number).suppressed);
        // A dead letter that failed before its fields were read keeps the record's key, the
        // user's id as most producers partition: matched by it.
        let keyed = Record {
            key: Some(b"u-gone".to_vec()),
            ..record(b"not json")
        };
        let letter = router.route(&keyed);
        assert_eq!(
            (letter.dead_letter, letter.suppressed),
            (Some(DeadLetterReason::NotJson), true)
        );
        // An id given twice is a dead letter, as any duplicated routing field, and is left out
        // when either is suppressed.
        let twice = record(event(r#","userId":"u-gone","userId":"u-kept""#).as_bytes());
        let twice = router.route(&twice);
        assert_eq!(
            (twice.dead_letter, twice.suppressed),
            (Some(DeadLetterReason::DuplicateKey), true),
            "one of its ids is suppressed"
        );
        // Without a list (or with an empty one) routing is what it always was.
        let gone = record(event(r#","userId":"u-gone""#).as_bytes());
        let plain = super::tests::router().with_index(index).route(&gone);
        let unsuppressed = super::tests::router()
            .with_suppression(Some(Arc::new(Suppression::new([]))))
            .with_index(index)
            .route(&gone);
        assert!(!unsuppressed.suppressed && !plain.suppressed);
        assert_eq!(plain, unsuppressed);
    }

    /// Keys are compared as JSON means them: an escaped key is the field it spells.
    #[test]
    fn an_escaped_key_names_its_field() {
        let payload = br#"{"projectI\u0064":"src1","received\u0041t":"2015-05-27T10:00:00Z"}"#;
        let escaped = record(payload);
        let routed = router().route(&escaped);
        assert_eq!(routed.dead_letter, None);
        assert!(matches!(
            routed.destination,
            Destination::Events { ref source, .. } if source == "src1"
        ));
        let twice =
            br#"{"projectId":"a","projectI\u0064":"b","receivedAt":"2015-05-27T10:00:00Z"}"#;
        assert_eq!(
            router().route(&record(twice)).dead_letter,
            Some(DeadLetterReason::DuplicateKey)
        );
    }

    #[test]
    fn event_goes_to_its_source_and_received_day() {
        let payload = br#"{"type":"track","projectId":"src1","receivedAt":"2015-05-27T23:59:59.999Z","properties":{"a":[1,{"b":null}]}}"#;
        let rec = record(payload);
        let routed = router().route(&rec);
        assert_eq!(
            routed.destination,
            Destination::Events {
                source: "src1".into(),
                day: "1432684800000".into()
            }
        );
        assert_eq!(routed.line.as_ref(), payload.as_slice());
        assert!(
            matches!(routed.line, Cow::Borrowed(_)),
            "valid one-line events are not copied"
        );
        assert_eq!(routed.dead_letter, None);
    }

    /// Opt-in bounds on what a producer can make the archiver open: only listed sources, and
    /// only received-days near the record's Kafka timestamp (2015-05-27 here).
    #[test]
    fn sources_outside_the_allowlist_and_days_outside_the_window_are_dead_letters() {
        let config = RoutingConfig {
            allowed_sources: ["web".to_string()].into(),
            received_at_window_days: Some(2),
            ..RoutingConfig::default()
        };
        let bounded = Router::new(&config, "events", 3);
        let reason = |source: &str, received: &str| {
            let payload =
                format!(r#"{{"projectId":"{source}","receivedAt":"{received}T10:00:00Z"}}"#);
            bounded.route(&record(payload.as_bytes())).dead_letter
        };
        assert_eq!(reason("web", "2015-05-27"), None);
        assert_eq!(reason("web", "2015-05-25"), None, "two days before");
        assert_eq!(reason("web", "2015-05-29"), None, "two days after");
        assert_eq!(
            reason("ios", "2015-05-27"),
            Some(DeadLetterReason::SourceNotAllowed)
        );
        assert_eq!(
            reason("web", "2015-05-24"),
            Some(DeadLetterReason::ReceivedAtOutsideWindow)
        );
        assert_eq!(
            reason("web", "9999-01-01"),
            Some(DeadLetterReason::ReceivedAtOutsideWindow)
        );
        // Without a Kafka timestamp there is nothing to hold the day against.
        let mut untimed = record(br#"{"projectId":"web","receivedAt":"0001-01-01T00:00:00Z"}"#);
        untimed.timestamp_ms = None;
        assert_eq!(bounded.route(&untimed).dead_letter, None);
        // Off by default: any source, any day.
        assert_eq!(
            router()
                .route(&record(
                    br#"{"projectId":"ios","receivedAt":"0001-01-01T00:00:00Z"}"#
                ))
                .dead_letter,
            None
        );
    }

    #[test]
    fn received_day_is_utc_whatever_the_offset() {
        let rec = record(br#"{"projectId":"s","receivedAt":"2015-05-28T01:30:00+02:00"}"#);
        assert_eq!(
            router().route(&rec).destination,
            Destination::Events {
                source: "s".into(),
                day: "1432684800000".into()
            }
        );
    }

    #[test]
    fn day_formats() {
        let day = NaiveDate::from_ymd_opt(2015, 5, 27).unwrap();
        assert_eq!(DayFormat::EpochMs.format(day), "1432684800000");
        assert_eq!(DayFormat::Date.format(day), "2015-05-27");
        assert_eq!(DayFormat::Hive.format(day), "day=2015-05-27");
    }

    #[test]
    fn a_header_key_that_is_not_utf8_is_a_dead_letter_kept_as_bytes() {
        let mut rec = record(br#"{"projectId":"s","receivedAt":"2015-05-27T00:00:00Z"}"#);
        rec.headers = vec![
            (b"trace".to_vec(), Some(b"t1".to_vec())),
            (b"\xff\xfek".to_vec(), Some(b"\x00\x01".to_vec())),
            (b"empty".to_vec(), None),
        ];
        let routed = router().route(&rec);
        assert_eq!(routed.dead_letter, Some(DeadLetterReason::BadHeader));
        let letter: serde_json::Value = serde_json::from_slice(&routed.line).unwrap();
        assert_eq!(letter["reason"], "bad-header");
        assert_eq!(
            letter["headers"],
            serde_json::json!([
                {"key": "trace", "value_base64": "dDE="},
                {"key_base64": "//5r", "value_base64": "AAE="},
                {"key": "empty", "value_base64": null},
            ])
        );
    }

    #[test]
    fn header_wins_over_field_and_static_is_last_resort() {
        let mut rec = record(br#"{"projectId":"from-field","receivedAt":"2015-05-27T00:00:00Z"}"#);
        rec.headers = vec![(b"source-id".to_vec(), Some(b"from-header".to_vec()))];
        let Destination::Events { source, .. } = router().route(&rec).destination else {
            panic!("not an event")
        };
        assert_eq!(source, "from-header");

        let config = RoutingConfig {
            source: vec![
                SourceRule::WriteKey("writeKey".into()),
                SourceRule::Field("projectId".into()),
                SourceRule::Static("fallback".into()),
            ],
            write_keys: [("wk1".to_string(), "mapped".to_string())].into(),
            ..RoutingConfig::default()
        };
        let router = Router::new(&config, "events", 0);
        let source_of = |payload: &[u8]| match router.route(&record(payload)).destination {
            Destination::Events { source, .. } => source,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            source_of(br#"{"writeKey":"wk1","projectId":"p","receivedAt":"2015-05-27T00:00:00Z"}"#),
            "mapped"
        );
        assert_eq!(
            source_of(
                br#"{"writeKey":"other","projectId":"p","receivedAt":"2015-05-27T00:00:00Z"}"#
            ),
            "p"
        );
        assert_eq!(
            source_of(br#"{"receivedAt":"2015-05-27T00:00:00Z"}"#),
            "fallback"
        );
    }

    #[test]
    fn multi_line_json_is_put_on_one_line() {
        let rec = record(b"{\n  \"projectId\": \"s\",\r\n  \"text\": \"a\\nb\",\n  \"receivedAt\": \"2015-05-27T00:00:00Z\"\n}\n");
        let routed = router().route(&rec);
        assert_eq!(routed.dead_letter, None);
        assert_eq!(
            routed.line.as_ref(),
            b"{  \"projectId\": \"s\",  \"text\": \"a\\nb\",  \"receivedAt\": \"2015-05-27T00:00:00Z\"}"
        );
    }

    #[test]
    fn bad_records_get_their_reason() {
        let cases: Vec<(Option<&[u8]>, DeadLetterReason)> = vec![
            (None, DeadLetterReason::Tombstone),
            (Some(b""), DeadLetterReason::Empty),
            (Some(b"not json"), DeadLetterReason::NotJson),
            (Some(br#"{"projectId":"s","#), DeadLetterReason::NotJson),
            (
                Some(br#"{"projectId":"s"} trailing"#),
                DeadLetterReason::NotJson,
            ),
            (Some(b"[1,2]"), DeadLetterReason::NotObject),
            (Some(b"\"str\""), DeadLetterReason::NotObject),
            (Some(b"42"), DeadLetterReason::NotObject),
            (Some(b"null"), DeadLetterReason::NotObject),
            (Some(b"{\"a\":\"\xff\"}"), DeadLetterReason::NotUtf8),
            (Some(b"{\"a\":\"\0\"}"), DeadLetterReason::NulByte),
            (
                Some(br#"{"receivedAt":"2015-05-27T00:00:00Z"}"#),
                DeadLetterReason::NoSource,
            ),
            (
                Some(br#"{"projectId":"../etc","receivedAt":"2015-05-27T00:00:00Z"}"#),
                DeadLetterReason::BadSourceId,
            ),
            (
                Some(br#"{"projectId":"_manifests","receivedAt":"2015-05-27T00:00:00Z"}"#),
                DeadLetterReason::BadSourceId,
            ),
            (
                Some(br#"{"projectId":7,"receivedAt":"2015-05-27T00:00:00Z"}"#),
                DeadLetterReason::BadSourceId,
            ),
            (
                Some(br#"{"projectId":"s"}"#),
                DeadLetterReason::NoReceivedAt,
            ),
            (
                Some(br#"{"projectId":"s","receivedAt":12}"#),
                DeadLetterReason::BadReceivedAt,
            ),
            (
                Some(br#"{"projectId":"s","receivedAt":"yesterday"}"#),
                DeadLetterReason::BadReceivedAt,
            ),
        ];
        let mut deep = vec![b'['; 200];
        deep.extend(vec![b']'; 200]);
        let deep = format!(
            r#"{{"projectId":"s","x":{}}}"#,
            String::from_utf8(deep).unwrap()
        );
        let mut cases = cases;
        cases.push((Some(deep.as_bytes()), DeadLetterReason::TooDeep));
        let big = vec![b' '; (1 << 20) + 1];
        cases.push((Some(&big), DeadLetterReason::TooLarge));

        for (payload, reason) in cases {
            let rec = Record {
                payload: payload.map(<[u8]>::to_vec),
                ..record(b"")
            };
            let routed = router().route(&rec);
            assert_eq!(routed.dead_letter, Some(reason), "payload {payload:?}");
            assert_eq!(
                routed.destination,
                Destination::DeadLetter {
                    day: "1432684800000".into()
                }
            );
            let letter: serde_json::Value = serde_json::from_slice(&routed.line).unwrap();
            assert_eq!(letter["reason"], reason.as_str());
            assert_eq!(letter["offset"], 7);
            assert_eq!(letter["partition"], 3);
            let original = letter["payload_base64"]
                .as_str()
                .map(|s| base64::engine::general_purpose::STANDARD.decode(s).unwrap());
            // A too-large letter keeps a prefix (its own test below).
            if reason != DeadLetterReason::TooLarge {
                assert!(original.as_deref() == payload, "payload of {reason}");
            }
        }
    }

    #[test]
    fn nesting_depth_ignores_brackets_inside_strings() {
        assert_eq!(nesting_depth(br#"{"a":"[[[{{{","b":[{"c":"\"]"}]}"#), 3);
        assert_eq!(nesting_depth(b"42"), 0);
    }

    #[test]
    fn kafka_timestamp_fallback_only_when_configured() {
        let rec = record(br#"{"projectId":"s"}"#);
        let config = RoutingConfig {
            fallback_to_kafka_timestamp: true,
            day_format: DayFormat::Date,
            ..RoutingConfig::default()
        };
        assert_eq!(
            Router::new(&config, "t", 0).route(&rec).destination,
            Destination::Events {
                source: "s".into(),
                day: "2015-05-27".into()
            }
        );
    }

    /// Most readers of JSON (JavaScript, Python, jq) take the last of a duplicated key, routing
    /// took the first: the folder an event is filed under and what a reader sees of it could
    /// disagree. A routing field given twice is a dead letter.
    #[test]
    fn a_routing_field_given_twice_is_a_dead_letter() {
        let twice = [
            &br#"{"projectId":"a","receivedAt":"2015-05-27T00:00:00Z","projectId":"b"}"#[..],
            br#"{"projectId":"a","receivedAt":"2015-05-27T00:00:00Z","receivedAt":"2020-01-01T00:00:00Z"}"#,
        ];
        for payload in twice {
            let record = record(payload);
            let routed = router().route(&record);
            assert_eq!(routed.dead_letter, Some(DeadLetterReason::DuplicateKey));
        }
        // Other fields given twice, and routing fields inside nested objects, are not routing's
        // concern.
        let fine = br#"{"projectId":"a","x":1,"x":2,"context":{"projectId":"c","projectId":"d"},"receivedAt":"2015-05-27T00:00:00Z"}"#;
        let fine = record(fine);
        assert_eq!(router().route(&fine).dead_letter, None);

        // A batch routing code 1 began is replayed as it routed: the first one counts.
        let first = Router::with_code(&RoutingConfig::default(), 1, "events", 3);
        let record = record(twice[0]);
        assert_eq!(
            first.route(&record).destination,
            Destination::Events {
                source: "a".into(),
                day: "1432684800000".into()
            }
        );
    }

    /// A too-large record's dead letter keeps the first `TOO_LARGE_KEPT_BYTES` of its payload
    /// and a SHA-256 of all of it, not the whole payload four times over (payload, base64, line,
    /// staged copy): memory per record stays bounded whatever a producer sends.
    #[test]
    fn a_too_large_payload_keeps_a_prefix_and_a_hash_in_its_dead_letter() {
        use sha2::Digest as _;
        let mut big = br#"{"projectId":"s","receivedAt":"2015-05-27T00:00:00Z","x":""#.to_vec();
        big.resize((1 << 20) + 100, b'y');
        big.extend_from_slice(br#""}"#);
        let big_record = record(&big);
        let routed = router().route(&big_record);
        assert_eq!(routed.dead_letter, Some(DeadLetterReason::TooLarge));
        assert!(routed.line.len() < 100_000, "{} bytes", routed.line.len());
        let letter: serde_json::Value = serde_json::from_slice(&routed.line).unwrap();
        let kept = base64::engine::general_purpose::STANDARD
            .decode(letter["payload_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(kept, big[..TOO_LARGE_KEPT_BYTES]);
        assert_eq!(letter["payload_bytes"], big.len());
        assert_eq!(letter["payload_truncated"], true);
        let sha = sha2::Sha256::digest(&big);
        assert_eq!(
            letter["payload_sha256"],
            sha.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );

        // A batch routing code 1 began is replayed as it routed: the whole payload.
        let first = Router::with_code(&RoutingConfig::default(), 1, "events", 3).route(&big_record);
        let letter: serde_json::Value = serde_json::from_slice(&first.line).unwrap();
        let kept = base64::engine::general_purpose::STANDARD
            .decode(letter["payload_base64"].as_str().unwrap())
            .unwrap();
        assert!(kept == big, "routing code 1 kept {} bytes", kept.len());
        assert!(
            letter.get("payload_truncated").is_none() && letter.get("payload_sha256").is_none()
        );
    }

    #[test]
    fn source_ids_that_would_escape_the_layout_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "_x",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_source_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "src-1", "A.b_c-9", &"x".repeat(128)] {
            assert!(check_source_id(good).is_ok(), "{good:?}");
        }
    }
}

/// Property tests over arbitrary input: routing never panics, never loses the original bytes,
/// and never names a folder outside the layout. `PROPTEST_CASES=1000000 cargo test --lib
/// route::fuzz` for a long run.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn check(record: &Record, router: &Router) {
        let routed = router.route(record);
        match (&routed.destination, routed.dead_letter) {
            (Destination::Events { source, day }, None) => {
                assert!(check_source_id(source).is_ok(), "{source:?}");
                assert!(day.bytes().all(|b| b.is_ascii_digit()), "{day:?}");
                assert!(!routed.line.contains(&b'\n') && !routed.line.contains(&b'\r'));
                // The line is the event: valid JSON, an object.
                let value: serde_json::Value = serde_json::from_slice(&routed.line).unwrap();
                assert!(value.is_object());
            }
            (Destination::DeadLetter { day }, Some(reason)) => {
                assert!(!day.contains('/'));
                let letter: serde_json::Value = serde_json::from_slice(&routed.line).unwrap();
                assert_eq!(letter["reason"], reason.as_str());
                let original = letter["payload_base64"]
                    .as_str()
                    .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap());
                assert_eq!(original.as_deref(), record.payload.as_deref());
                // Every header's key and value come back as the bytes the producer sent.
                let b64 = |v: &serde_json::Value| {
                    v.as_str()
                        .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                };
                let headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = letter["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| {
                        let key = match h["key"].as_str() {
                            Some(text) => text.as_bytes().to_vec(),
                            None => b64(&h["key_base64"]).unwrap(),
                        };
                        (key, b64(&h["value_base64"]))
                    })
                    .collect();
                assert_eq!(headers, record.headers);
            }
            other => panic!("inconsistent routing: {other:?}"),
        }
    }

    fn record(payload: Option<Vec<u8>>, header: Option<Vec<u8>>) -> Record {
        Record {
            offset: 1,
            timestamp_ms: Some(1_700_000_000_000),
            key: None,
            payload,
            headers: header
                .map(|h| vec![(b"source-id".to_vec(), Some(h))])
                .unwrap_or_default(),
        }
    }

    /// The walk `nesting_depth` replaced, byte by byte: the oracle of the differential test.
    fn nesting_depth_byte_by_byte(payload: &[u8]) -> usize {
        let (mut depth, mut deepest) = (0usize, 0usize);
        let (mut in_string, mut escaped) = (false, false);
        for &byte in payload {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    /// Bytes where quotes, backslashes, brackets and line breaks are common.
    fn json_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            Just(b'"'),
            Just(b'\\'),
            Just(b'{'),
            Just(b'}'),
            Just(b'['),
            Just(b']'),
            Just(b'\n'),
            Just(b'\r'),
            Just(0u8),
            any::<u8>(),
        ];
        proptest::collection::vec(byte, 0..256)
    }

    proptest! {
        #[test]
        fn the_raw_scan_agrees_with_a_byte_by_byte_walk(payload in json_ish_bytes()) {
            let scan = RawScan::of(&payload);
            prop_assert_eq!(scan.depth, nesting_depth_byte_by_byte(&payload));
            prop_assert_eq!(scan.nul, payload.contains(&0));
            prop_assert_eq!(scan.line_break, payload.iter().any(|&b| b == b'\n' || b == b'\r'));
        }

        #[test]
        fn arbitrary_bytes_route_without_panic(
            payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512)),
            header in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            other_key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        ) {
            let router = Router::new(&RoutingConfig::default(), "t", 0);
            let mut record = record(payload, header);
            if let Some(key) = other_key {
                record.headers.push((key, Some(b"v".to_vec())));
            }
            let routed = router.route(&record);
            if record.headers.iter().any(|(key, _)| std::str::from_utf8(key).is_err()) {
                prop_assert_eq!(routed.dead_letter, Some(DeadLetterReason::BadHeader));
            }
            check(&record, &router);
        }

        #[test]
        fn mutated_events_route_without_panic(
            cut in 0usize..200,
            insert in proptest::collection::vec(any::<u8>(), 0..8),
            source in "[A-Za-z0-9._/ -]{0,12}",
        ) {
            let event = format!(
                r#"{{"projectId":"{source}","receivedAt":"2026-11-20T10:00:00.000Z","properties":{{"a":[1,{{"b":"\n"}}]}}}}"#
            );
            let mut bytes = event.into_bytes();
            let at = cut.min(bytes.len());
            bytes.splice(at..at, insert);
            let router = Router::new(&RoutingConfig::default(), "t", 0);
            check(&record(Some(bytes), None), &router);
        }
    }
}
