//! The baselines `scripts/bench.sh` measures the archiver against (bench only), each timed in
//! this process and reported as one JSON line on stdout (or stderr when stdout carries data):
//!
//! - `drain BROKERS TOPIC PARTITIONS COUNT [--lines]`: a plain consumer (librdkafka defaults, no
//!   group, every partition from the beginning) reading COUNT records; to nowhere, or with
//!   `--lines` writing each payload as a line to stdout — what `kcat -C -e -t TOPIC` does, to
//!   pipe into `gzip -6` as a user would script it.
//! - `committed BROKERS TOPIC PARTITIONS GROUP COUNT`: waits until GROUP's committed offsets add
//!   up to COUNT, polling every 50 ms; the archiver's finish line.
//! - `wait-metric PORT NAME VALUE`: waits until the series NAME on 127.0.0.1:PORT/metrics
//!   reaches VALUE, polling every 50 ms (a shell loop of curl or python would steal the CPU it
//!   measures).
//! - `metric PORT NAME`: prints the series NAME on 127.0.0.1:PORT/metrics.
//! - `zlib FILE LEVEL`: the archiver's own deflate backend (flate2 on zlib-rs) compressing FILE
//!   as one gzip stream on one core, for the compression limit beside `gzip -6`; its wall and
//!   CPU seconds.
//! - `put ENDPOINT BUCKET PREFIX CONCURRENCY DIR`: a plain uploader, the limit of the archiver's
//!   upload tail: every file under DIR PUT to PREFIX + its path under DIR, CONCURRENCY at a
//!   time, each read whole and sent with its CRC32C as the archiver sends it (path-style,
//!   credentials from the environment); no manifest, no commit, no retry. Its wall seconds,
//!   CPU seconds and what it sent.

use std::io::{BufWriter, Read, Write};
use std::time::Instant;

use futures_util::StreamExt as _;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("drain") if args.len() >= 5 => drain(
            &args[1],
            &args[2],
            args[3].parse().expect("PARTITIONS is a number"),
            args[4].parse().expect("COUNT is a number"),
            args.get(5).is_some_and(|a| a == "--lines"),
        ),
        Some("committed") if args.len() == 6 => committed(
            &args[1],
            &args[2],
            args[3].parse().expect("PARTITIONS is a number"),
            &args[4],
            args[5].parse().expect("COUNT is a number"),
        ),
        Some("wait-metric") if args.len() == 4 => wait_metric(
            args[1].parse().expect("PORT is a number"),
            &args[2],
            args[3].parse().expect("VALUE is a number"),
        ),
        Some("metric") if args.len() == 3 => println!(
            "{}",
            metric_value(args[1].parse().expect("PORT is a number"), &args[2]).unwrap_or(0.0)
        ),
        Some("zlib") if args.len() == 3 => {
            zlib(&args[1], args[2].parse().expect("LEVEL is a number"))
        }
        Some("put") if args.len() == 6 => put(
            &args[1],
            &args[2],
            &args[3],
            args[4].parse().expect("CONCURRENCY is a number"),
            std::path::Path::new(&args[5]),
        ),
        _ => {
            eprintln!(
                "usage: bench_baseline drain BROKERS TOPIC PARTITIONS COUNT [--lines]\n       \
                 bench_baseline committed BROKERS TOPIC PARTITIONS GROUP COUNT\n       \
                 bench_baseline wait-metric PORT NAME VALUE\n       \
                 bench_baseline metric PORT NAME\n       \
                 bench_baseline zlib FILE LEVEL\n       \
                 bench_baseline put ENDPOINT BUCKET PREFIX CONCURRENCY DIR"
            );
            std::process::exit(2);
        }
    }
}

fn drain(brokers: &str, topic: &str, partitions: i32, count: u64, lines: bool) {
    let started = Instant::now();
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-baseline")
        .set("enable.auto.commit", "false");
    // BENCH_CONSUMER_PROPERTIES="key=value,key=value": librdkafka settings to try on the drain.
    for pair in std::env::var("BENCH_CONSUMER_PROPERTIES")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').expect("key=value");
        client.set(key, value);
    }
    let consumer: BaseConsumer = client.create().expect("create consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < count {
        match consumer.poll(std::time::Duration::from_secs(10)) {
            Some(Ok(message)) => {
                let payload = message.payload().unwrap_or_default();
                records += 1;
                bytes += payload.len() as u64 + 1;
                if lines {
                    out.write_all(payload).expect("write stdout");
                    out.write_all(b"\n").expect("write stdout");
                }
            }
            Some(Err(err)) => panic!("consume failed: {err}"),
            None => panic!("no record for 10 s after {records} of {count}"),
        }
    }
    out.flush().expect("flush stdout");
    let seconds = started.elapsed().as_secs_f64();
    let report = format!(r#"{{"records":{records},"bytes":{bytes},"seconds":{seconds:.3}}}"#);
    if lines {
        eprintln!("{report}");
    } else {
        println!("{report}");
    }
}

fn committed(brokers: &str, topic: &str, partitions: i32, group: &str, count: i64) {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("create consumer");
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    loop {
        let total: i64 = consumer
            .committed_offsets(wanted.clone(), std::time::Duration::from_secs(5))
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    })
                    .sum()
            })
            .unwrap_or(0);
        if total >= count {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(r#"{{"committed":{count},"seconds":{seconds:.3}}}"#);
}

fn metric_value(port: u16, name: &str) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn wait_metric(port: u16, name: &str, at_least: f64) {
    while metric_value(port, name).is_none_or(|v| v < at_least) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn zlib(path: &str, level: u32) {
    let mut input = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut input))
        .expect("read input");
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(input.len() / 4),
        flate2::Compression::new(level),
    );
    encoder.write_all(&input).expect("compress");
    let compressed = encoder.finish().expect("compress").len();
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    println!(
        r#"{{"bytes":{},"compressed":{compressed},"seconds":{seconds:.3},"cpu_seconds":{cpu_seconds:.3}}}"#,
        input.len()
    );
}

fn put(endpoint: &str, bucket: &str, prefix: &str, concurrency: usize, dir: &std::path::Path) {
    use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
    use base64::Engine as _;

    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read DIR") {
            let path = entry.expect("read DIR").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start a runtime");
    let cpu_before = process_cpu_seconds();
    let (objects, bytes, seconds) = runtime.block_on(async {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .load()
            .await;
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .endpoint_url(endpoint)
                .force_path_style(true)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .build(),
        );
        let started = Instant::now();
        let sent: Vec<u64> = futures_util::stream::iter(files.iter().map(|path| {
            let client = client.clone();
            let key = format!(
                "{prefix}{}",
                path.strip_prefix(dir).expect("under DIR").display()
            );
            async move {
                let body = tokio::fs::read(path).await.expect("read a file");
                let crc32c = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &body) as u32;
                let crc32c = base64::engine::general_purpose::STANDARD.encode(crc32c.to_be_bytes());
                let len = body.len() as u64;
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .checksum_crc32_c(crc32c)
                    .body(body.into())
                    .send()
                    .await
                    .unwrap_or_else(|err| panic!("PUT {key}: {err:?}"));
                len
            }
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
        (
            sent.len(),
            sent.iter().sum::<u64>(),
            started.elapsed().as_secs_f64(),
        )
    });
    // The SDK's cost of a PUT on this machine, for the archiver's cost per object to be read
    // against (it sends two requests an object: the manifest's HEAD and the PUT).
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    println!(
        r#"{{"objects":{objects},"bytes":{bytes},"seconds":{seconds:.3},"cpu_seconds":{cpu_seconds:.3}}}"#
    );
}

/// User and system CPU time of this process so far (Linux: `/proc/self/stat`, in clock ticks of
/// 1/100 s, the kernel's USER_HZ on every Linux the bench runs on).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // The command name (field 2) may hold spaces; fields after its closing parenthesis do not.
    let after_name = &stat[stat.rfind(')').expect("stat has the command name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}
