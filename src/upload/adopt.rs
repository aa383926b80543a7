//! Adoption: what a replay does with the objects an earlier, interrupted attempt of its batch
//! put, when Kafka deleted the head of the batch in between (retention reaching a batch that
//! waited to be replayed). The replay cuts where the first attempt did (the files kept with the
//! intent, [`crate::pipeline::KeptIntent`]), so each of its files holds the last lines of the
//! attempt's file under the same key. An object already there is kept and listed in the
//! manifest, the lines Kafka no longer holds counted as `deleted_from_kafka`, rather than
//! replaced by fewer lines or left beside the replay's as a stray; so is a planned file none of
//! whose records Kafka still holds, when an attempt put it (when none had, the manifest names
//! it as one that may still appear: `Manifest::may_appear`).

use std::collections::HashMap;
use std::io::Read as _;

use tokio_util::sync::CancellationToken;

use super::manifest::ManifestFile;
use super::store::ObjectStore;
use super::{Shared, UploadError};
use crate::layout::{self, Codec};
use crate::pipeline::{PlannedFile, SealedBatch, SealedFile};

impl<S: ObjectStore> Shared<S> {
    /// The entry of the object at `planned`'s key, if an attempt of `batch` put it and the
    /// replay's lines of that file (`replayed`; `None`: Kafka holds none of them) are its last
    /// lines; `None` when there is no such object, and the replay puts its own.
    pub(super) async fn adopt(
        &self,
        batch: &SealedBatch,
        epoch: u64,
        planned: &PlannedFile,
        replayed: Option<&SealedFile>,
        stop: &CancellationToken,
    ) -> Result<Option<ManifestFile>, UploadError> {
        let u = &self.uploader;
        let partition = batch.partition;
        let key = layout::object_key(
            &u.prefix,
            &batch.topic,
            partition,
            &planned.destination,
            planned.first_offset,
            planned.codec,
        );
        let present = self
            .with_retries(partition, epoch, stop, |_| u.store.head_metadata(&key))
            .await?;
        let Some(present) = present.filter(|present| names_batch(present, batch)) else {
            return Ok(None);
        };
        let (Some(records), Some(crc32)) = (
            present
                .get("record-count")
                .and_then(|n| n.parse::<u64>().ok()),
            present.get("content-crc32").cloned(),
        ) else {
            return Ok(None);
        };
        let replayed_records = replayed.map_or(0, |file| file.records);
        if records < replayed_records {
            return Ok(None);
        }
        let (uncompressed_bytes, compressed_bytes) =
            if (records, crc32.as_str()) == (planned.records, &format!("{:08x}", planned.crc32)) {
                // The first attempt's whole file: the replay's lines are its last ones by
                // construction (the same rules, the same cuts).
                (planned.uncompressed_bytes, planned.compressed_bytes)
            } else {
                // Put by an earlier replay, which Kafka had left more of: look at the lines.
                let body = self
                    .with_retries(partition, epoch, stop, |_| u.store.get_bytes(&key))
                    .await?;
                let Some(body) = body else {
                    return Ok(None);
                };
                let (codec, local) = (planned.codec, replayed.map(|f| f.path.clone()));
                let checked = tokio::task::spawn_blocking(move || {
                    let lines = decode(&body, codec).ok()?;
                    let ours = match local {
                        Some(path) => decode(&std::fs::read(path).ok()?, codec).ok()?,
                        None => Vec::new(),
                    };
                    lines
                        .ends_with(&ours)
                        .then_some((lines.len() as u64, body.len() as u64))
                })
                .await
                .expect("adoption check");
                let Some(sizes) = checked else {
                    return Ok(None);
                };
                sizes
            };
        Ok(Some(ManifestFile {
            key,
            first_offset: planned.first_offset,
            records,
            uncompressed_bytes,
            compressed_bytes,
            crc32,
            deleted_from_kafka: records - replayed_records,
            forgotten: 0,
        }))
    }
}

/// Whether an object's metadata says it belongs to `batch` (its partition is in the key).
fn names_batch(metadata: &HashMap<String, String>, batch: &SealedBatch) -> bool {
    metadata.get("batch-start") == Some(&batch.start.to_string())
        && metadata.get("batch-end") == Some(&batch.end.to_string())
}

/// The uncompressed lines of an object's bytes.
fn decode(bytes: &[u8], codec: Codec) -> std::io::Result<Vec<u8>> {
    let mut lines = Vec::new();
    match codec {
        Codec::Zstd => zstd::stream::read::Decoder::new(bytes)?.read_to_end(&mut lines)?,
        Codec::Gzip => flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut lines)?,
    };
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_decode_to_their_lines() {
        use std::io::Write as _;
        let lines = b"{\"a\":1}\n{\"b\":2}\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(lines).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(&gz, Codec::Gzip).unwrap(), lines);
        let zst = zstd::stream::encode_all(&lines[..], 3).unwrap();
        assert_eq!(decode(&zst, Codec::Zstd).unwrap(), lines);
        assert!(decode(b"not compressed", Codec::Gzip).is_err());
    }
}
