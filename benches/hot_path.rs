//! The hot path per core: routing and compressing realistic events into a partition's files,
//! against plain gzip -6 (the same zlib backend) over the same NDJSON bytes — the limit the
//! archiver cannot beat on one core. `cargo bench --bench hot_path`.
//!
//! "line by line" feeds each record straight to its file's compressor (a stage limit of zero),
//! as the archiver did before files staged their lines: it shows what interleaving 200
//! compressors costs when each line pulls a different compressor's state into the cache.

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kafka_s3_archiver::buffer::{BufferSettings, PartitionBuffer};
use kafka_s3_archiver::config::RoutingConfig;
use kafka_s3_archiver::pipeline::Record;
use kafka_s3_archiver::produce::{EventGenerator, GeneratorSettings};
use kafka_s3_archiver::route::Router;

fn events() -> Vec<Record> {
    let mut generator = EventGenerator::new(GeneratorSettings {
        sources: 100,
        start_day: chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(),
        days: 2,
        near_midnight: 0.05,
        seed: 7,
        minimal: false,
        pad_bytes: 0,
    });
    (0..40_000)
        .map(|offset| {
            let (key, payload) = generator.next_event();
            Record {
                offset,
                timestamp_ms: Some(1_795_000_000_000),
                key: Some(key.into_bytes()),
                payload: Some(payload.into_bytes()),
                headers: vec![],
            }
        })
        .collect()
}

fn hot_path(c: &mut Criterion) {
    let records = events();
    let ndjson: Vec<u8> = records
        .iter()
        .flat_map(|r| {
            r.payload
                .clone()
                .unwrap()
                .into_iter()
                .chain(std::iter::once(b'\n'))
        })
        .collect();
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Bytes(ndjson.len() as u64));
    group.sample_size(10);

    group.bench_function("gzip -6 of the same ndjson (limit)", |b| {
        b.iter(|| {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(ndjson.len() / 4),
                flate2::Compression::new(6),
            );
            encoder.write_all(black_box(&ndjson)).unwrap();
            black_box(encoder.finish().unwrap().len())
        })
    });

    let router = Router::new(&RoutingConfig::default(), "events", 0);
    group.bench_function("route only", |b| {
        b.iter(|| {
            records
                .iter()
                .map(|r| router.route(black_box(r)).line.len())
                .sum::<usize>()
        })
    });

    // Suppression at the scale of Segment's own limit (110,000 users a month): each event's
    // `userId` and `anonymousId` hashed and looked up; none of these events' users is on it.
    let suppressing = router.clone().with_suppression(Some(std::sync::Arc::new(
        kafka_s3_archiver::suppress::Suppression::new(
            (0..100_000).map(|n| kafka_s3_archiver::suppress::hash_id(&format!("gone-{n}"))),
        ),
    )));
    group.bench_function("route only, 100,000-id suppression list", |b| {
        b.iter(|| {
            records
                .iter()
                .map(|r| suppressing.route(black_box(r)).line.len())
                .sum::<usize>()
        })
    });

    // The id index (`output.id_index`, on by default): each event's ids read and hashed for
    // its file's filter, alone and beside the list.
    let indexing = router.clone().with_index(true);
    group.bench_function("route only, id index", |b| {
        b.iter(|| {
            records
                .iter()
                .map(|r| indexing.route(black_box(r)).ids.keys().len())
                .sum::<usize>()
        })
    });
    let both = suppressing.clone().with_index(true);
    group.bench_function("route only, id index + 100,000-id suppression list", |b| {
        b.iter(|| {
            records
                .iter()
                .map(|r| both.route(black_box(r)).ids.keys().len())
                .sum::<usize>()
        })
    });

    let settings = BufferSettings {
        compression_level: 6,
        max_file_bytes: 256 << 20,
        max_batch_bytes: 1 << 30,
        max_batch_files: 1000,
        codec: kafka_s3_archiver::layout::Codec::Gzip,
        zstd_level: 3,
        id_index: true,
    };
    // The third: files heat and cool as in a worker with 32 compressors for its 200 files (the
    // worker cools the least recently used an eighth below its share when it passes it).
    for (name, stage_limit, compressors) in [
        ("route + compress into 200 files + seal", None, None),
        (
            "route + compress into 200 files + seal, line by line",
            Some(0),
            None,
        ),
        (
            "route + compress into 200 files + seal, 32 compressors",
            None,
            Some(32),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let mut buffer = PartitionBuffer::fresh(
                        dir.path(),
                        "events",
                        0,
                        router.clone(),
                        settings,
                        Some(0),
                    )
                    .unwrap();
                    if let Some(limit) = stage_limit {
                        buffer.set_stage_limit(limit);
                    }
                    let mut hot_files = 0;
                    for (tick, record) in records.iter().enumerate() {
                        let appended = buffer.append(record, tick as u64).unwrap();
                        hot_files += usize::from(appended.is_some_and(|a| a.heated));
                        let Some(cap) = compressors.filter(|&cap| hot_files > cap) else {
                            continue;
                        };
                        let mut hot: Vec<(u64, usize)> = buffer.hot_file_ticks().collect();
                        hot.sort_unstable();
                        let excess = hot.len() - (cap - cap / 8);
                        for &(_, index) in &hot[..excess] {
                            buffer.cool_file(index).unwrap();
                        }
                        hot_files = hot.len() - excess;
                    }
                    black_box(buffer.seal().unwrap().unwrap().compressed_bytes())
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
