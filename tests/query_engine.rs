//! A real query engine reads the bucket as users would: a day downloaded with awscli, queried
//! with DuckDB (from PyPI, `OPS_PYTHON`, installed by `scripts/test.sh`) straight from the gzip
//! files, in Segment's epoch-ms folders and in `day=` folders through `hive_partitioning`. The
//! counts per source and day must equal what was produced.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::*;

/// Events produced per (source, received-day), read from the topic itself.
fn produced(rig: &Rig, partitions: u32) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for payload in rig
        .read_topic(partitions)
        .values()
        .flat_map(BTreeMap::values)
    {
        let event: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let source = event["projectId"].as_str().unwrap().to_string();
        let day = event["receivedAt"].as_str().unwrap()[..10].to_string();
        *counts.entry((source, day)).or_default() += 1;
    }
    counts
}

/// Runs `sql` in DuckDB with the working directory `dir`; rows of (source, day, count).
fn query(dir: &std::path::Path, sql: &str) -> BTreeMap<(String, String), u64> {
    let script = format!(
        "import duckdb, json\nrows = duckdb.sql({sql:?}).fetchall()\nprint(json.dumps([[str(r[0]), str(r[1]), int(r[2])] for r in rows]))"
    );
    let output = Command::new(std::env::var("OPS_PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "duckdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<(String, String, u64)> = serde_json::from_slice(&output.stdout).unwrap();
    rows.into_iter().map(|(s, d, n)| ((s, d), n)).collect()
}

#[test]
fn duckdb_counts_what_was_produced_per_source_and_day_in_both_layouts() {
    // Segment's layout: epoch-ms day folders, the source and day read from the path.
    let rig = Rig::start(2);
    rig.produce(6_000, 3, 2, 21);
    let expected = produced(&rig, 2);
    assert!(expected.len() >= 6, "{expected:?}");
    rig.archive_to_the_end(
        "archiver",
        2,
        &[("ARCHIVER_ROUTING_DAY_FORMAT", "epoch-ms")],
    );
    let bucket = rig.dir.path().join("bucket");
    rig.s3.download(&bucket);
    let counts = query(
        &bucket,
        "select regexp_extract(filename, 'segment-logs/([^/]+)/', 1) as source, \
                strftime(make_timestamp(cast(regexp_extract(filename, 'segment-logs/[^/]+/([0-9]+)/', 1) as bigint) * 1000), '%Y-%m-%d') as day, \
                count(*) \
         from read_ndjson('segment-logs/*/*/*.gz', filename = true) \
         group by all order by all",
    );
    assert_eq!(counts, expected);
    drop(rig);

    // Hive-style `day=` folders, which DuckDB turns into a column.
    let rig = Rig::start(2);
    rig.produce(6_000, 3, 2, 22);
    let expected = produced(&rig, 2);
    rig.archive_to_the_end("archiver", 2, &[("ARCHIVER_ROUTING_DAY_FORMAT", "hive")]);
    let bucket = rig.dir.path().join("bucket");
    // A user's download: one source's folder at a time, as Segment's docs show.
    for (source, _) in expected.keys() {
        let dir = bucket.join(source);
        rig.s3.aws(&[
            "s3",
            "sync",
            "--only-show-errors",
            &format!("s3://{BUCKET}/segment-logs/{source}/"),
            dir.to_str().unwrap(),
        ]);
    }
    let counts = query(
        &bucket,
        "select projectId, day, count(*) \
         from read_ndjson('*/*/*.gz', hive_partitioning = true) \
         group by all order by all",
    );
    assert_eq!(counts, expected);
}
