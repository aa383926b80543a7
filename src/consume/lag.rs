//! Lag: how far the group's committed offsets are behind the topic's high watermarks, per
//! partition. Used by `kafka-s3-archiver lag` to report progress and to wait until everything
//! produced is archived and committed.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka_client::{inspector, Inspector};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    pub low_watermark: i64,
    pub high_watermark: i64,
    /// One past the last offset actually readable: the high watermark on a correct broker, more
    /// on brokers that report the start of their last record batch (tansu 0.6 does).
    pub end_offset: i64,
    /// `None` when the group never committed this partition.
    pub committed: Option<i64>,
}

impl PartitionLag {
    /// Records produced but not yet committed by the group.
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low_watermark);
        (self.end_offset - from).max(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("cannot reach kafka at {brokers}: {message}")]
    Connect { brokers: String, message: String },
    #[error("topic {topic} does not exist or has no partitions")]
    NoTopic { topic: String },
}

/// Reads the group's committed offsets and the topic's watermarks.
pub fn group_lag(config: &Config) -> Result<Vec<PartitionLag>, LagError> {
    let connect = |source: KafkaError| LagError::Connect {
        brokers: config.kafka.brokers.clone(),
        message: config.redact(&source.to_string()),
    };
    let consumer = inspector(&config.kafka).map_err(connect)?;
    let topic = &config.kafka.topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(connect)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(LagError::NoTopic {
            topic: topic.clone(),
        });
    }
    let mut tpl = TopicPartitionList::new();
    for &partition in &partitions {
        tpl.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(tpl, TIMEOUT).map_err(connect)?;
    let mut watermarks = Vec::new();
    for &partition in &partitions {
        watermarks.push(
            consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .map_err(connect)?,
        );
    }
    let ends = read_end_offsets(&consumer, topic, &partitions, &watermarks);
    let mut lags = Vec::new();
    for ((partition, (low, high)), end_offset) in partitions.into_iter().zip(watermarks).zip(ends) {
        let committed = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            });
        lags.push(PartitionLag {
            partition,
            low_watermark: low,
            high_watermark: high,
            end_offset,
            committed,
        });
    }
    lags.sort_by_key(|l| l.partition);
    Ok(lags)
}

/// Whether Kafka holds a record a consumer would get in each `(partition, from, end)` of the
/// config's topic, reading from `from`: a partition whose last offsets hold no record (a
/// transaction's commit marker, an aborted transaction's records) is one the group has archived
/// to its end though its commit stays below the end offset. A partition with nothing between
/// `from` and `end` holds none, nor one whose first record is at or past `end` (written since);
/// one that yields nothing for a second and a half is taken to hold none.
pub fn records_between(
    config: &Config,
    ranges: &[(i32, i64, i64)],
) -> Result<std::collections::HashMap<i32, bool>, LagError> {
    use rdkafka::message::Message;
    let topic = &config.kafka.topic;
    let mut found: std::collections::HashMap<i32, bool> = ranges
        .iter()
        .map(|&(partition, _, _)| (partition, false))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for &(partition, from, end) in ranges {
        if from < end {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(from));
        }
    }
    if tpl.count() == 0 {
        return Ok(found);
    }
    let connect = |source: KafkaError| LagError::Connect {
        brokers: config.kafka.brokers.clone(),
        message: config.redact(&source.to_string()),
    };
    let consumer = inspector(&config.kafka).map_err(connect)?;
    consumer.assign(&tpl).map_err(connect)?;
    // A partition is read in offset order, so its first record decides it: before `end`, a
    // record lies in the range; at or past it (the topic goes on being written), none does.
    let mut undecided: std::collections::HashSet<i32> = ranges
        .iter()
        .filter(|&&(_, from, end)| from < end)
        .map(|&(partition, _, _)| partition)
        .collect();
    let idle = Duration::from_millis(1500);
    let mut last_decision = std::time::Instant::now();
    while !undecided.is_empty() && last_decision.elapsed() < idle {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let partition = message.partition();
            // Records of decided partitions are not progress: a partition whose range holds
            // only markers, and after it nothing yet, must still time out.
            if undecided.remove(&partition) {
                last_decision = std::time::Instant::now();
                let before_end = ranges
                    .iter()
                    .any(|&(p, _, end)| p == partition && message.offset() < end);
                found.insert(partition, before_end);
            }
        }
    }
    let _ = consumer.unassign();
    Ok(found)
}

/// Reads from just before each high watermark to the end, so the end offset is what a consumer
/// actually gets rather than what the broker reports.
fn read_end_offsets(
    consumer: &Inspector,
    topic: &str,
    partitions: &[i32],
    watermarks: &[(i64, i64)],
) -> Vec<i64> {
    use rdkafka::message::Message;
    let mut ends: Vec<i64> = watermarks.iter().map(|&(_, high)| high).collect();
    let mut tpl = TopicPartitionList::new();
    for (&partition, &(low, high)) in partitions.iter().zip(watermarks) {
        if high > low {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset((high - 1).max(low)));
        }
    }
    if tpl.count() == 0 || consumer.assign(&tpl).is_err() {
        return ends;
    }
    let idle = Duration::from_millis(1500);
    let mut last_message = std::time::Instant::now();
    while last_message.elapsed() < idle {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            last_message = std::time::Instant::now();
            if let Some(index) = partitions.iter().position(|&p| p == message.partition()) {
                ends[index] = ends[index].max(message.offset() + 1);
            }
        }
    }
    let _ = consumer.unassign();
    ends
}
