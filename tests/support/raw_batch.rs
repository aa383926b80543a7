//! A record batch written by hand and appended with a bare Produce request (version 3), for the
//! batches no real producer sends — compressed bytes that do not decompress — so tests can see
//! what the archiver does when it meets one in the log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Kafka's id for gzip in a record batch's attributes.
pub const GZIP: i16 = 1;

/// Appends one record batch claiming `records` records compressed with `codec` but holding
/// `payload` as its compressed bytes, to `topic`/`partition`. Each broker of `bootstrap` is
/// asked in turn until the partition's leader takes it; returns the batch's base offset.
pub fn append_batch(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    codec: i16,
    records: i32,
    payload: &[u8],
) -> i64 {
    let request = produce_request(topic, partition, &record_batch(codec, records, payload));
    let mut answers = Vec::new();
    for broker in bootstrap.split(',') {
        let mut stream = match TcpStream::connect(broker) {
            Ok(stream) => stream,
            Err(err) => {
                answers.push(format!("{broker}: {err}"));
                continue;
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&request).expect("send produce");
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).expect("produce response size");
        let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
        stream.read_exact(&mut response).expect("produce response");
        let (error, base_offset) = produce_answer(&response);
        if error == 0 {
            return base_offset;
        }
        answers.push(format!("{broker}: error {error}"));
    }
    panic!("no broker took the batch: {answers:?}");
}

/// A record batch (magic 2) with `payload` as its records section.
fn record_batch(codec: i16, records: i32, payload: &[u8]) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // What the CRC covers: from the attributes to the end.
    let mut checked = Vec::new();
    checked.extend(codec.to_be_bytes());
    checked.extend((records - 1).to_be_bytes()); // last offset delta
    checked.extend(now.to_be_bytes()); // first timestamp
    checked.extend(now.to_be_bytes()); // max timestamp
    checked.extend((-1i64).to_be_bytes()); // producer id: none
    checked.extend((-1i16).to_be_bytes()); // producer epoch
    checked.extend((-1i32).to_be_bytes()); // base sequence
    checked.extend(records.to_be_bytes());
    checked.extend(payload);

    let mut after_length = Vec::new();
    after_length.extend(0i32.to_be_bytes()); // partition leader epoch
    after_length.push(2); // magic
    after_length.extend(crc32c(&checked).to_be_bytes());
    after_length.extend(checked);

    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset: the broker assigns it
    batch.extend((after_length.len() as i32).to_be_bytes());
    batch.extend(after_length);
    batch
}

/// Produce (API key 0) version 3, acks from all replicas, one topic, one partition.
fn produce_request(topic: &str, partition: i32, batch: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(0i16.to_be_bytes()); // api key: Produce
    body.extend(3i16.to_be_bytes()); // api version
    body.extend(1i32.to_be_bytes()); // correlation id
    put_string(&mut body, "raw-batch-test");
    body.extend((-1i16).to_be_bytes()); // transactional id: none
    body.extend((-1i16).to_be_bytes()); // acks: all
    body.extend(10_000i32.to_be_bytes()); // timeout
    body.extend(1i32.to_be_bytes()); // topics
    put_string(&mut body, topic);
    body.extend(1i32.to_be_bytes()); // partitions
    body.extend(partition.to_be_bytes());
    body.extend((batch.len() as i32).to_be_bytes());
    body.extend(batch);
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend(body);
    request
}

/// The error code and base offset of the one partition a Produce v3 response answers for.
fn produce_answer(response: &[u8]) -> (i16, i64) {
    let mut at = 4 + 4; // correlation id, topic count
    let name_length = i16::from_be_bytes([response[at], response[at + 1]]) as usize;
    at += 2 + name_length + 4 + 4; // topic name, partition count, partition index
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    let base_offset = i64::from_be_bytes(response[at + 2..at + 10].try_into().unwrap());
    (error, base_offset)
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as i16).to_be_bytes());
    out.extend(text.as_bytes());
}

/// CRC-32C (Castagnoli), bit by bit: a few hundred bytes per test ("123456789" gives the
/// standard check value 0xE3069283).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
