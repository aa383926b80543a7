//! kafka-s3-archiver: archives a Kafka topic of Segment-spec events into S3 as gzip
//! newline-delimited JSON under `segment-logs/{source-id}/{received-day}/`, committing offsets
//! only once the files holding them are in S3.
//!
//! A record's way through the modules, in order; every message between them is defined in
//! [`pipeline`]:
//!
//! - [`consume`]: the rdkafka poll loop (a blocking thread) and its rebalance callbacks;
//! - [`route`]: record → `(source, day)` file or dead letter, a pure function, or nowhere when
//!   [`suppress`]ed (a user deleted from the archive);
//! - [`buffer`]: per-partition batches of compressed files on local disk (worker threads);
//! - [`checkpoint`]: durable local state per partition and recovery from it;
//! - [`upload`]: sealed batches to S3, with retries;
//! - [`commit`]: uploaded batches to committed offsets, fenced by assignment epochs.
//!
//! Around them: [`config`], [`schedule`] (when batches are sealed), [`layout`] (every key and
//! path, and the destination types), [`rules`] (the cutting rules a replay reproduces), [`metrics`], [`produce`] (a load generator), [`verify`] (checks the bucket against manifests and
//! commits), [`restore`] (the archive back into a topic), [`forget`] (users deleted from the
//! archive) and [`app`] (wiring and shutdown).

pub mod app;
pub mod buffer;
pub mod check;
pub mod checkpoint;
pub mod commit;
pub mod config;
pub mod consume;
pub mod forget;
pub mod index;
pub mod kafka_client;
pub mod layout;
pub mod metrics;
pub mod object;
pub mod pipeline;
pub mod produce;
pub mod restore;
pub mod retry;
pub mod route;
pub mod rules;
pub mod schedule;
pub mod suppress;
pub mod upload;
pub mod verify;
