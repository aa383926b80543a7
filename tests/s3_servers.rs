//! The archive on a second S3 implementation: s3s-fs (crates.io, a separate process), which
//! verifies the checksums it is sent and honours `If-None-Match`, where moto checks neither.
//!
//! Found here: with the defaults (`checksum = "crc32c"` and Segment's `Content-Encoding: gzip`)
//! the SDK streamed its CRC32C as an aws-chunked trailer and sent `Content-Encoding:
//! aws-chunked` as a second header line beside `gzip`; AWS S3 takes the two (HTTP folds
//! repeated fields into one list), s3s-fs refused them ("duplicate header: content-encoding"),
//! as Garage refuses the trailer. The archiver now computes the CRC32C itself and sends it as a
//! header, so every combination archives every event exactly once here (README, "S3-compatible
//! stores").

mod support;

use std::time::Duration;

use support::*;

#[test]
fn a_store_that_checks_checksums_takes_the_defaults_content_md5_and_crc32c_without_content_encoding(
) {
    let rig = Rig::start(2);
    rig.produce(4_000, 3, 2, 41);
    let records = rig.read_topic(2);
    let ends = end_offsets(&records);
    for (name, checksum, label) in [
        ("defaults", "crc32c", "segment"),
        ("md5", "content-md5", "segment"),
        ("crc32c", "crc32c", "gzip"),
    ] {
        let server = S3sFs::start(&rig.dir.path().join(name));
        let endpoint = server.endpoint();
        let group = format!("archiver-{name}");
        let mut archiver = rig.archiver(
            name,
            &rig.dir.path().join(format!("data-{name}")),
            &[
                ("ARCHIVER_S3_ENDPOINT_URL", &endpoint),
                ("ARCHIVER_S3_CHECKSUM", checksum),
                ("ARCHIVER_S3_CONTENT_LABEL", label),
                ("ARCHIVER_KAFKA_GROUP_ID", &group),
                ("ARCHIVER_SCHEDULE_INTERVAL_SECS", "3"),
                ("ARCHIVER_SCHEDULE_OFFSET_SECS", "0"),
            ],
        );
        rig.wait_committed_in(
            &group,
            &ends,
            Duration::from_secs(120),
            &mut [&mut archiver],
        );
        assert!(
            archiver.terminate(Duration::from_secs(40)).success(),
            "{}",
            archiver.log_text()
        );
        let objects = archived_objects(&server.bucket_dir(), &rig.topic);
        assert_exactly_once(&objects, &records, None);
        let log = archiver.log_text();
        assert!(!log.contains("s3 refused"), "{name}: {log}");
    }
}
