//! Where each restored line goes and how a rerun knows it was sent.
//!
//! Every message carries its position in the plan — `{run}:{object}:{line}` in the
//! `kafka-s3-archiver-restore` header — and goes to the partition its key picks (Kafka's own
//! murmur2 partitioner, so other clients place the same keys alike). Lines are produced in plan
//! order by an idempotent producer, which writes each partition's messages in order and without
//! gaps; so what reached a partition is always a prefix of what was meant for it, and the last
//! message of this run in each partition says where that prefix ends. A rerun sends a line only
//! if it lies after the end of its partition's prefix.

use std::collections::HashMap;

/// The header holding a message's position.
pub const POSITION_HEADER: &str = "kafka-s3-archiver-restore";

/// A line of the plan: the object's index in the plan, and the line's number in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub object: u32,
    pub line: u64,
}

impl Position {
    pub fn encode(self, run: &str) -> String {
        format!("{run}:{}:{}", self.object, self.line)
    }

    /// The position in a header value, if the message was sent by `run`.
    pub fn decode(value: &[u8], run: &str) -> Option<Position> {
        let text = std::str::from_utf8(value).ok()?;
        let rest = text.strip_prefix(run)?.strip_prefix(':')?;
        let (object, line) = rest.split_once(':')?;
        Some(Position {
            object: object.parse().ok()?,
            line: line.parse().ok()?,
        })
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
        let header = position.encode("abcd");
        assert_eq!(header, "abcd:3:1234");
        assert_eq!(Position::decode(header.as_bytes(), "abcd"), Some(position));
        assert_eq!(Position::decode(header.as_bytes(), "abc"), None);
        assert_eq!(Position::decode(b"other:1:2", "abcd"), None);
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
