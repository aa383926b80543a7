//! zstd objects (`output.compression = "zstd"`) as their readers see them: one frame each, with
//! `Content-Type: application/zstd`, read back whole by the zstd CLI, by Python's `zstandard`
//! with its single-frame `decompress`, by DuckDB, and by `restore`; every event once.

mod support;

use std::process::Command;

use support::*;

fn python(dir: &std::path::Path, script: &str) -> String {
    let output = Command::new(std::env::var("OPS_PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn zstd_objects_are_one_frame_that_every_reader_reads_whole() {
    let rig = Rig::start(2);
    rig.produce(6_000, 3, 2, 31);
    let records = rig.read_topic(2);
    rig.archive_to_the_end(
        "archiver",
        2,
        &[
            ("ARCHIVER_OUTPUT_COMPRESSION", "zstd"),
            ("ARCHIVER_OUTPUT_ZSTD_LEVEL", "6"),
        ],
    );

    let bucket = rig.dir.path().join("bucket");
    rig.s3.download(&bucket);
    // The oracle decodes each object as exactly one frame.
    let objects = archived_objects(&bucket, &rig.topic);
    assert!(
        objects.iter().all(|o| o.key.ends_with(".zst")),
        "not all .zst"
    );
    assert_exactly_once(&objects, &records, None);
    let head = rig.s3.head(&objects[0].key);
    assert_eq!(head["ContentType"], "application/zstd", "{head}");
    assert!(head.get("ContentEncoding").is_none(), "{head}");

    // The zstd CLI.
    let mut lines = 0;
    for (key, path) in files_under(&bucket) {
        if !key.ends_with(".zst") || key.contains("/_") {
            continue;
        }
        let output = Command::new(std::env::var("ZSTD_BIN").unwrap_or_else(|_| "zstd".into()))
            .args(["-dc", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(output.status.success(), "zstd -dc {key}");
        lines += output.stdout.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(lines, 6_000);

    // Python's zstandard: decompress() reads one frame, using the size in its header.
    let count = python(
        &bucket,
        "import glob, zstandard\n\
         d = zstandard.ZstdDecompressor()\n\
         print(sum(d.decompress(open(f, 'rb').read()).count(b'\\n') for f in glob.glob('segment-logs/[!_]*/*/*.zst')))",
    );
    assert_eq!(count, "6000");

    // DuckDB.
    let count = python(
        &bucket,
        "import duckdb\nprint(duckdb.sql(\"select count(*) from read_ndjson('segment-logs/*/*/*.zst')\").fetchone()[0])",
    );
    assert_eq!(count, "6000");

    // restore reads them too: a dry run counts every event of the two days and their edges.
    rig.broker.create_topic("replayed", 1);
    let stdout = rig.command_ok(&[
        "restore",
        "--dry-run",
        "--topic",
        "replayed",
        "--from",
        "2026-11-19",
        "--to",
        "2026-11-22",
    ]);
    assert!(stdout.contains("would send 6000 events"), "{stdout}");
}
