//! The S3 client against a real S3-API server (moto, a separate process): multipart uploads,
//! which objects of the other tests are too small to need, in both checksum modes.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use kafka_s3_archiver::config::{ChecksumMode, S3Config};
use kafka_s3_archiver::upload::s3::{ObjectMetadata, PutOutcome, S3Store};
use kafka_s3_archiver::upload::store::ObjectStore as _;
use support::*;

const PART: u64 = 5 << 20;

fn config(server: &S3Server, checksum: ChecksumMode) -> S3Config {
    // The SDK's default credential chain reads these; every test sets the same values.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    S3Config {
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        endpoint_url: server.endpoint(),
        force_path_style: true,
        checksum,
        multipart_threshold_bytes: PART,
        multipart_part_bytes: PART,
        ..S3Config::default()
    }
}

fn metadata(record_count: u64) -> ObjectMetadata {
    ObjectMetadata {
        topic: "events".into(),
        partition: 0,
        batch_start: 0,
        batch_end: 9,
        first_offset: 0,
        record_count,
        content_crc32: 0x1234_5678,
        codec: kafka_s3_archiver::layout::Codec::Gzip,
    }
}

/// Bytes that differ from part to part, so a part taken from the wrong place shows.
fn contents(len: u64, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_round_trips_in_both_checksum_modes() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let path = dir.path().join("object.gz");
    let bytes = contents(2 * PART + 12_345, 1);
    std::fs::write(&path, &bytes).unwrap();
    for checksum in [ChecksumMode::Crc32c, ChecksumMode::ContentMd5] {
        let store = S3Store::connect(&config(&server, checksum)).await;
        let key = format!("segment-logs/multipart-{checksum:?}.gz");
        let outcome = store
            .put_file(
                &key,
                &path,
                bytes.len() as u64,
                &metadata(3),
                false,
                &|| true,
            )
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Written);
        let stored = store.get_bytes(&key).await.unwrap().unwrap();
        assert!(
            stored == bytes,
            "{checksum:?}: the object differs from the file"
        );
        // A replay of the same batch finds it in place and leaves it alone.
        let again = store
            .put_file(&key, &path, bytes.len() as u64, &metadata(3), true, &|| {
                true
            })
            .await
            .unwrap();
        assert_eq!(again, PutOutcome::AlreadyPresent);
    }
}

/// Every part of one upload comes from the one file that was sealed, even if the path is
/// replaced during the upload (a partition revoked and assigned again re-creates its batch
/// directory while a zombie upload of the old epoch is still running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_reads_every_part_from_the_file_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let store = S3Store::connect(&config(&server, ChecksumMode::Crc32c)).await;
    let path = dir.path().join("object.gz");
    let sealed = contents(3 * PART, 2);
    let replacement = contents(3 * PART, 3);
    std::fs::write(&path, &sealed).unwrap();

    let asked = AtomicUsize::new(0);
    let still_ours = || {
        // Before the second part: another file takes the path.
        if asked.fetch_add(1, Ordering::SeqCst) == 1 {
            write_atomically(&path, &replacement);
        }
        true
    };
    let key = "segment-logs/replaced-during-upload.gz";
    let outcome = store
        .put_file(
            key,
            &path,
            sealed.len() as u64,
            &metadata(5),
            false,
            &still_ours,
        )
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::Written);
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "the upload was not in parts"
    );
    let stored = store.get_bytes(key).await.unwrap().unwrap();
    let from_sealed = stored
        .chunks(PART as usize)
        .zip(sealed.chunks(PART as usize))
        .map(|(got, want)| got == want)
        .collect::<Vec<_>>();
    assert!(
        stored == sealed,
        "parts that match the sealed file: {from_sealed:?} (length {} of {})",
        stored.len(),
        sealed.len()
    );
}

/// A single PUT asks whether the partition is still this member's after it opened its file, and
/// then reads only that file: a stale upload (the partition revoked and assigned again, its
/// batch directory re-created) neither puts the object nor streams the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_put_reads_the_file_it_opened_and_only_while_the_partition_is_ours() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(dir.path());
    let path = dir.path().join("object.gz");
    // A small object is read whole, a larger one streamed from the file: both read the file
    // they opened.
    for (size, checksum) in [
        (100_000, ChecksumMode::Crc32c),
        (100_000, ChecksumMode::ContentMd5),
        (PART / 4, ChecksumMode::Crc32c),
        (PART / 4, ChecksumMode::ContentMd5),
    ] {
        let sealed = contents(size, 7);
        let replacement = contents(size, 8);
        let store = S3Store::connect(&config(&server, checksum)).await;
        std::fs::write(&path, &sealed).unwrap();

        // The partition moved just as the file was opened: nothing is put.
        let key = format!("segment-logs/stale-{size}-{checksum:?}.gz");
        let len = sealed.len() as u64;
        let outcome = store
            .put_file_once(&key, &path, len, &metadata(4), false, &|| false)
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Abandoned, "{size} {checksum:?}");
        assert_eq!(
            store.get_bytes(&key).await.unwrap(),
            None,
            "{size} {checksum:?}"
        );

        // Another file takes the path once this one is open: the sealed bytes are put.
        let still_ours = || {
            write_atomically(&path, &replacement);
            true
        };
        let key = format!("segment-logs/replaced-{size}-{checksum:?}.gz");
        let outcome = store
            .put_file_once(&key, &path, len, &metadata(4), false, &still_ours)
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Written, "{size} {checksum:?}");
        let stored = store.get_bytes(&key).await.unwrap().unwrap();
        assert!(
            stored == sealed,
            "{size} {checksum:?}: the object is not the sealed file"
        );
    }
}
