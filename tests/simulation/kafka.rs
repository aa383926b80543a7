//! The simulation's Kafka: one log per partition, with retention that deletes its head and
//! control records (transaction markers) that hold an offset but no record, and the group's
//! committed offsets with their metadata, which the group can lose (offsets expiring after the
//! group sat empty, a renamed `group.id`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use kafka_s3_archiver::buffer::LogStarts;
use kafka_s3_archiver::pipeline::Record;

/// One partition's log: `entries[i]` is offset `start + i`; `None` is a control record.
#[derive(Debug, Default)]
pub struct Log {
    pub start: i64,
    entries: VecDeque<Option<Record>>,
}

impl Log {
    /// The next offset to be written (the high watermark).
    pub fn end(&self) -> i64 {
        self.start + self.entries.len() as i64
    }

    pub fn append(&mut self, record: Option<Record>) -> i64 {
        let offset = self.end();
        self.entries
            .push_back(record.map(|record| Record { offset, ..record }));
        offset
    }

    /// Deletes every offset below `offset` (see `Cluster::delete_before`).
    fn delete_before(&mut self, offset: i64) {
        let offset = offset.min(self.end());
        while self.start < offset {
            self.entries.pop_front();
            self.start += 1;
        }
    }

    /// Up to `max` records from `from`, and the offset after the last one looked at: as a fetch
    /// answers, control records are skipped over, not delivered.
    pub fn read(&self, from: i64, max: usize) -> (Vec<Record>, i64) {
        let mut records = Vec::new();
        let mut next = from.max(self.start);
        while next < self.end() && records.len() < max {
            if let Some(record) = &self.entries[(next - self.start) as usize] {
                records.push(record.clone());
            }
            next += 1;
        }
        (records, next)
    }
}

/// The cluster: the topic's logs and the group's commits.
#[derive(Debug, Default)]
pub struct Cluster {
    pub topic: String,
    pub logs: BTreeMap<i32, Log>,
    /// The group's committed offset and metadata of each partition.
    pub committed: BTreeMap<i32, (i64, String)>,
    /// The group's generation: a member joining starts a new one, and the coordinator refuses
    /// commits from members of an older one (a zombie's).
    pub generation: u64,
    /// Each log's start, as the brokers answer a ListOffsets from any thread (the buffer
    /// worker's `LogStarts`).
    starts: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl Cluster {
    pub fn new(topic: &str, partitions: i32) -> Cluster {
        Cluster {
            topic: topic.to_string(),
            logs: (0..partitions).map(|p| (p, Log::default())).collect(),
            committed: BTreeMap::new(),
            generation: 0,
            starts: Arc::new(Mutex::new((0..partitions).map(|p| (p, 0)).collect())),
        }
    }

    /// Retention (by size or time) or DeleteRecords: every offset of `partition` below
    /// `offset` goes.
    pub fn delete_before(&mut self, partition: i32, offset: i64) {
        let log = self.logs.get_mut(&partition).expect("partition exists");
        log.delete_before(offset);
        self.starts.lock().unwrap().insert(partition, log.start);
    }

    /// What a member's buffer worker asks for a log's start.
    pub fn log_starts(&self) -> LogStarts {
        let starts = Arc::clone(&self.starts);
        Arc::new(move |partition| starts.lock().unwrap().get(&partition).copied())
    }
}
