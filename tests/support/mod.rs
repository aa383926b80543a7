//! The shared end-to-end harness: starts real servers (tansu as the Kafka broker, moto as the S3
//! server) as separate processes on free local ports, runs the archiver binary as a process that
//! can be killed, and reads back what landed in Kafka and in the bucket (through awscli, the
//! client the Segment docs tell users to download with).
//!
//! By role: `process.rs` (spawned processes, ports, logs), `broker.rs` (tansu or the mock
//! cluster), `s3.rs` (moto and awscli), `s3_proxy.rs` (S3 faults), `rig.rs` (one test's servers
//! and archivers), `oracle.rs` (what the bucket holds against what was produced), `raw_batch.rs` (batches
//! no real producer sends).
//!
//! Server binaries come from `TANSU_BIN`, `MOTO_SERVER` and `AWS_CLI` (set by `scripts/test.sh`,
//! which installs them), or from `PATH`.

#![allow(dead_code)]

mod broker;
mod oracle;
mod process;
pub mod raw_batch;
mod rig;
mod s3;
pub mod s3_proxy;

// Each test file uses a part of the harness.
#[allow(unused_imports)]
pub use {broker::*, oracle::*, process::*, rig::*, s3::*};

pub const BUCKET: &str = "archive-test";
pub const ARCHIVER: &str = env!("CARGO_BIN_EXE_kafka-s3-archiver");
