//! Where each restored line goes and how a rerun knows it was sent.
//!
//! Every message carries its position in the plan — `{run}:{object}:{line}` in the
//! `kafka-s3-archiver-restore` header — and goes to the partition its key picks (Kafka's own
//! murmur2 partitioner, so other clients place the same keys alike). Lines are produced in plan
//! order by an idempotent producer, which writes each partition's messages in order and without
//! gaps (no message of it times out alone, and any failure stops the whole run: `delivery.rs`);
//! so what reached a partition is always a prefix of what was meant for it, and the last
//! message of this run in each partition says where that prefix ends. A rerun sends a line only
//! if it lies after the end of its partition's prefix.
//!
//! Anyone who can produce to the target topic could write a header with a high position of the
//! run and make a rerun count lines as sent that never were: a position is signed
//! (`{run}:{object}:{line}:{mac}`, HMAC-SHA256 under a key kept in the run's plan, in the bucket,
//! which producers to the topic cannot read), and one whose signature does not check is not the
//! run's. Plans made before positions were signed have no key, and their runs go on unsigned.

use std::collections::HashMap;

use hmac::{KeyInit, Mac};

/// Lower-case hex of `bytes`: how a plan keeps its signing key and a header its signature.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes `text` spells in hex (an even number of digits), `None` if it is not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The header holding a message's position.
pub const POSITION_HEADER: &str = "kafka-s3-archiver-restore";

/// A line of the plan: the object's index in the plan, and the line's number in the object.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Position {
    pub object: u32,
    pub line: u64,
}

/// Bytes of the signature kept in a header (of HMAC-SHA256's 32): forging one is a 2^-128 guess.
const MAC_BYTES: usize = 16;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How one restore marks the messages it sends: its run name and, for a signed run, the key.
#[derive(Clone)]
pub struct RunMarker {
    run: String,
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for RunMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RunMarker")
            .field("run", &self.run)
            .field("signed", &self.key.is_some())
            .finish()
    }
}

impl RunMarker {
    /// `key`: the run's signing key, `None` for a run whose plan has none (unsigned).
    pub fn new(run: &str, key: Option<Vec<u8>>) -> RunMarker {
        RunMarker {
            run: run.to_string(),
            key,
        }
    }

    /// A fresh signing key for a new plan, from the operating system's random source.
    pub fn new_key() -> Result<Vec<u8>, String> {
        let mut key = vec![0; 32];
        getrandom::getrandom(&mut key).map_err(|err| err.to_string())?;
        Ok(key)
    }

    fn mac(&self, key: &[u8], unsigned: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
        mac.update(unsigned.as_bytes());
        mac
    }

    /// The header value of the line at `position`.
    pub fn encode(&self, position: Position) -> String {
        let unsigned = format!("{}:{}:{}", self.run, position.object, position.line);
        match &self.key {
            None => unsigned,
            Some(key) => {
                let tag = self.mac(key, &unsigned).finalize().into_bytes();
                format!("{unsigned}:{}", to_hex(&tag[..MAC_BYTES]))
            }
        }
    }

    /// The position in a header value, if this run sent it: its name, and for a signed run a
    /// signature that checks (anything else is another run's, or forged).
    pub fn decode(&self, value: &[u8]) -> Option<Position> {
        let text = std::str::from_utf8(value).ok()?;
        let rest = text.strip_prefix(&self.run)?.strip_prefix(':')?;
        let mut fields = rest.split(':');
        let (object, line) = (fields.next()?, fields.next()?);
        let position = Position {
            object: object.parse().ok()?,
            line: line.parse().ok()?,
        };
        match (&self.key, fields.next(), fields.next()) {
            (None, None, _) => Some(position),
            (Some(key), Some(hex), None) if hex.len() == 2 * MAC_BYTES => {
                let tag = from_hex(hex)?;
                let unsigned = format!("{}:{object}:{line}", self.run);
                self.mac(key, &unsigned)
                    .verify_truncated_left(&tag)
                    .ok()
                    .map(|()| position)
            }
            _ => None,
        }
    }
}

/// Kafka's murmur2 (the Java client's default partitioner hashes keys with it).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a line: by its key as Kafka's default partitioner would place it, or, for a
/// line without one, by its position (spread, and the same on every run).
pub fn partition_for(key: Option<&[u8]>, position: Position, partitions: i32) -> i32 {
    let hash = match key {
        Some(key) => murmur2(key),
        None => murmur2(format!("{}:{}", position.object, position.line).as_bytes()),
    };
    (hash & 0x7fff_ffff) % partitions.max(1)
}

/// What earlier runs of a restore already sent: the last position of the run in each partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    last: HashMap<i32, Position>,
}

impl Sent {
    pub fn new(last: HashMap<i32, Position>) -> Sent {
        Sent { last }
    }

    /// Whether the line at `position`, meant for `partition`, reached it already.
    pub fn contains(&self, partition: i32, position: Position) -> bool {
        self.last
            .get(&partition)
            .is_some_and(|last| position <= *last)
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_partitioner() {
        // Values of org.apache.kafka.common.utils.Utils.murmur2 (Kafka's own tests).
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn positions_round_trip_and_belong_to_their_run() {
        let position = Position {
            object: 3,
            line: 1_234,
        };
        let unsigned = RunMarker::new("abcd", None);
        let header = unsigned.encode(position);
        assert_eq!(header, "abcd:3:1234");
        assert_eq!(unsigned.decode(header.as_bytes()), Some(position));
        assert_eq!(RunMarker::new("abc", None).decode(header.as_bytes()), None);
        assert_eq!(unsigned.decode(b"other:1:2"), None);
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(from_hex("00ab7f"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(from_hex("00AB7F"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(from_hex("0ab"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
    }

    /// A producer to the target topic can copy a run's headers and write any it likes, but
    /// without the key in the plan it cannot sign a position the run did not send.
    #[test]
    fn a_forged_position_is_not_the_runs() {
        let key = RunMarker::new_key().unwrap();
        assert_eq!(key.len(), 32);
        assert_ne!(key, RunMarker::new_key().unwrap(), "a fresh key each plan");
        let key_hex = to_hex(&key);
        let run = RunMarker::new("abcd", Some(key));
        let sent = Position {
            object: 3,
            line: 1_234,
        };
        let header = run.encode(sent);
        assert!(header.starts_with("abcd:3:1234:"), "{header}");
        assert_eq!(header.len(), "abcd:3:1234:".len() + 32);
        assert_eq!(run.decode(header.as_bytes()), Some(sent));
        // Forgeries: unsigned, a seen signature on a higher position, another key's signature.
        assert_eq!(run.decode(b"abcd:99:0"), None);
        let signature = header.rsplit(':').next().unwrap();
        assert_eq!(
            run.decode(format!("abcd:99:0:{signature}").as_bytes()),
            None
        );
        let other = RunMarker::new("abcd", Some(RunMarker::new_key().unwrap()));
        assert_eq!(run.decode(other.encode(sent).as_bytes()), None);
        assert_eq!(run.decode(format!("{header}:1").as_bytes()), None);
        // An unsigned run (a plan made before signing) does not take signed headers either.
        assert_eq!(RunMarker::new("abcd", None).decode(header.as_bytes()), None);
        assert!(
            !format!("{run:?}").contains(&key_hex[..16]),
            "the key never shows"
        );
    }

    #[test]
    fn a_line_was_sent_if_it_lies_within_its_partitions_prefix() {
        let at = |object, line| Position { object, line };
        let sent = Sent::new(HashMap::from([(0, at(2, 10)), (1, at(0, 5))]));
        assert!(sent.contains(0, at(1, 999)));
        assert!(sent.contains(0, at(2, 10)));
        assert!(!sent.contains(0, at(2, 11)));
        assert!(!sent.contains(1, at(1, 0)));
        assert!(!sent.contains(2, at(0, 0)));
        // Keys pick partitions as Kafka does; keyless lines spread by position.
        assert_eq!(partition_for(Some(b"user-1"), at(0, 0), 12), {
            (murmur2(b"user-1") & 0x7fff_ffff) % 12
        });
        assert_eq!(
            partition_for(None, at(4, 7), 12),
            partition_for(None, at(4, 7), 12)
        );
    }
}
