//! Batch manifests: one small JSON object per uploaded batch under `segment-logs/_manifests/`,
//! listing its objects with record counts, sizes and checksums. Written after the objects and
//! before the offsets are committed, so a manifest present means its objects are all there;
//! `verify` reads them to find gaps, overlaps, missing and extra objects.

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Gap, GapCause};
use crate::layout;
use crate::pipeline::{PlannedFile, SealedBatch, SealedFile};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub topic: String,
    pub partition: i32,
    /// First and last offset the batch covers.
    pub start: i64,
    pub end: i64,
    pub records: u64,
    pub files: Vec<ManifestFile>,
    /// Offsets of `[start, end]` that hold no record, and why (version 2 on): with `records`
    /// they account for every offset of the batch.
    #[serde(default)]
    pub gaps: Vec<Gap>,
    /// Files of a replay's plan that Kafka kept none of the records of and that no attempt had
    /// put when the replay looked: the first attempt, frozen past its session timeout (a zombie
    /// that has not heard yet), may still put one after this manifest. Such an object is the
    /// batch's, holding these lines, which the batch's `deleted` gap already accounts for; no
    /// other object holds them. Listed so that no later object of the batch lies in no manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_appear: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub key: String,
    pub first_offset: i64,
    pub records: u64,
    pub uncompressed_bytes: u64,
    /// Size of the object as uploaded; a replay compresses the same lines, possibly to other
    /// bytes, so compare lines, not sizes, across replays.
    pub compressed_bytes: u64,
    /// CRC32 of the uncompressed content (the gzip trailer's), hex.
    pub crc32: String,
    /// Lines of the object (among `records`) whose offsets the batch lists as a `deleted` gap:
    /// an earlier, interrupted upload of the batch put the object before Kafka deleted those
    /// records, and the replay adopted it (nothing is deleted twice, or archived twice).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deleted_from_kafka: u64,
    /// Lines `forget` took out of the object since it was archived (users deleted from the
    /// archive): with `records`, the lines it was archived with. The other fields describe the
    /// object as it is now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub forgotten: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ManifestFile {
    /// The entry of a sealed file, as uploaded from the local disk.
    pub fn of_sealed(prefix: &str, batch: &SealedBatch, file: &SealedFile) -> ManifestFile {
        ManifestFile {
            key: layout::object_key(
                prefix,
                &batch.topic,
                batch.partition,
                &file.destination,
                file.first_offset,
                file.codec,
            ),
            first_offset: file.first_offset,
            records: file.records,
            uncompressed_bytes: file.stream.uncompressed_len,
            compressed_bytes: file.stream.compressed_len,
            crc32: format!("{:08x}", file.stream.crc32),
            deleted_from_kafka: 0,
            forgotten: 0,
        }
    }

    /// The entry of a file as the batch's first attempt cut it, whose every line Kafka deleted
    /// since (see [`Manifest::may_appear`]).
    pub fn of_planned(prefix: &str, batch: &SealedBatch, planned: &PlannedFile) -> ManifestFile {
        ManifestFile {
            key: layout::object_key(
                prefix,
                &batch.topic,
                batch.partition,
                &planned.destination,
                planned.first_offset,
                planned.codec,
            ),
            first_offset: planned.first_offset,
            records: planned.records,
            uncompressed_bytes: planned.uncompressed_bytes,
            compressed_bytes: planned.compressed_bytes,
            crc32: format!("{:08x}", planned.crc32),
            deleted_from_kafka: planned.records,
            forgotten: 0,
        }
    }
}

/// 2: manifests list their gaps, and `verify` checks that they account for every offset.
pub const VERSION: u32 = 2;

impl Manifest {
    /// The manifest of `batch` as uploaded from the local disk.
    pub fn for_batch(prefix: &str, batch: &SealedBatch) -> Manifest {
        let files = batch
            .files
            .iter()
            .map(|file| ManifestFile::of_sealed(prefix, batch, file))
            .collect();
        Manifest::with_files(batch, files)
    }

    /// The manifest of `batch` listing `files`, the objects the bucket holds for it (a replay
    /// may have adopted some an earlier attempt put).
    pub fn with_files(batch: &SealedBatch, files: Vec<ManifestFile>) -> Manifest {
        Manifest {
            version: VERSION,
            topic: batch.topic.clone(),
            partition: batch.partition,
            start: batch.start,
            end: batch.end,
            records: files.iter().map(|f| f.records).sum(),
            files,
            gaps: batch.gaps.clone(),
            may_appear: Vec::new(),
        }
    }

    /// Offsets of `[start, end]` neither in a file nor in a known gap: lost records. Only
    /// meaningful from version 2, which records gaps.
    pub fn unaccounted_offsets(&self) -> Option<i64> {
        let gaps: u64 = self.gaps.iter().map(Gap::offsets).sum();
        let deleted_yet_archived: u64 = self.files.iter().map(|f| f.deleted_from_kafka).sum();
        let forgotten: u64 = self.files.iter().map(|f| f.forgotten).sum();
        let records = (self.records + forgotten) as i64 - deleted_yet_archived as i64;
        (self.version >= 2).then(|| self.end - self.start + 1 - records - gaps as i64)
    }

    /// Offsets Kafka deleted before they were archived.
    pub fn deleted(&self) -> impl Iterator<Item = &Gap> {
        self.gaps.iter().filter(|g| g.cause == GapCause::Deleted)
    }

    pub fn key(&self, prefix: &str) -> String {
        layout::manifest_key(prefix, &self.topic, self.partition, self.start, self.end)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }
}
