//! The `kafka-s3-archiver` binary: parses the command line, loads the config and hands over to
//! the library. `run` archives; `produce` generates sample events; `lag` reports (or waits for)
//! the group's progress.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use kafka_s3_archiver::config::Config;
use kafka_s3_archiver::consume::lag::group_lag;
use kafka_s3_archiver::metrics::Metrics;
use kafka_s3_archiver::produce::{self, EventGenerator, GeneratorSettings, ProduceSettings};
use kafka_s3_archiver::restore::{self, plan::Selection, Progress, RestoreOptions};
use kafka_s3_archiver::route::DeadLetterReason;
use kafka_s3_archiver::schedule::UploadNow;

#[derive(Parser)]
#[command(
    version,
    about = "Archive a Kafka topic of Segment events into S3, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML config file; ARCHIVER_{SECTION}_{KEY} variables and --set override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one setting, e.g. --set s3.bucket=archive (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(
            self.config.as_deref(),
            std::env::vars(),
            &self.overrides,
        )?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Consume the topic and archive it to S3 until SIGTERM; SIGUSR1 uploads what is buffered now.
    Run(ConfigArgs),
    /// Produce realistic Segment events to the configured topic.
    Produce {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of events.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Number of sources (projectIds).
        #[arg(long, default_value_t = 5)]
        sources: usize,
        /// Number of received-days the events spread over.
        #[arg(long, default_value_t = 2)]
        days: u32,
        /// First received-day (default: days before today).
        #[arg(long)]
        start_day: Option<NaiveDate>,
        /// Share of events received within a minute of a midnight.
        #[arg(long, default_value_t = 0.1)]
        near_midnight: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Small events with only the fields routing needs.
        #[arg(long)]
        minimal: bool,
        /// Pad each event to at least this many bytes (a `padding` property of random letters).
        #[arg(long, default_value_t = 0)]
        pad_bytes: usize,
        /// Send every event to this partition instead of partitioning by user.
        #[arg(long)]
        partition: Option<i32>,
        /// How the producer compresses its batches: none, gzip, snappy, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compression: String,
    },
    /// Check the configuration, the brokers, the topic, the group and the bucket (a probe object
    /// is written and deleted); one line per check, non-zero exit on any failure.
    Check(ConfigArgs),
    /// Check the bucket against the batch manifests and the group's committed offsets; exits
    /// non-zero on any finding.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
        /// Also download and decompress every object and look for duplicate messageIds.
        #[arg(long)]
        deep: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send archived events (or dead letters) back into a Kafka topic, one message per line,
    /// exactly once in total: run it again with the same arguments to resume where it stopped.
    Restore {
        #[command(flatten)]
        config: ConfigArgs,
        /// Topic to send to (it must exist).
        #[arg(long)]
        topic: String,
        /// A source id to restore (repeatable; default: every source).
        #[arg(long = "source", value_name = "ID")]
        sources: Vec<String>,
        /// First received-day: a date (2026-11-20) or a day folder as the archive names it.
        #[arg(long, value_name = "DAY")]
        from: String,
        /// Last received-day, inclusive.
        #[arg(long, value_name = "DAY")]
        to: String,
        /// Send the original records of dead letters instead of events.
        #[arg(long)]
        dead_letter: bool,
        /// With --dead-letter: only records dead-lettered for this reason (repeatable).
        #[arg(long = "reason", value_name = "REASON")]
        reasons: Vec<String>,
        /// With --dead-letter: also the letters of records without a Kafka timestamp (filed
        /// under the day folder `unknown`), whatever --from and --to say.
        #[arg(long)]
        undated: bool,
        /// Event field that keys a message, first present wins (repeatable).
        #[arg(long = "key-field", value_name = "FIELD",
              default_values_t = ["anonymousId", "userId", "messageId"].map(String::from))]
        key_fields: Vec<String>,
        /// Events per second at most (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Megabytes sent but not yet acknowledged, at most.
        #[arg(long, default_value_t = 64)]
        max_in_flight_mb: u64,
        /// Print the objects, bytes and events a run would send; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Skip and count objects that are not valid gzip and lines that are not JSON.
        #[arg(long)]
        skip_corrupt: bool,
    },
    /// Stop archiving users' events (a deletion request): adds their ids to the suppression list
    /// in the bucket, which every member takes up within `suppression.refresh_secs`; from each
    /// partition's next batch, an event whose userId or anonymousId is on it is left out,
    /// counted and recorded in its batch's manifest. Ids are stored only as SHA-256 hashes.
    Suppress {
        #[command(flatten)]
        config: ConfigArgs,
        /// An id to suppress (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// A file of ids, one per line ("-": standard input).
        #[arg(long, value_name = "FILE")]
        ids_file: Option<PathBuf>,
    },
    /// Delete users from the archive (a deletion request): suppresses their ids, waits until no
    /// batch that could still hold their events is open or awaiting a replay, then rewrites
    /// every object of the selection holding one without those lines, and its batch manifest.
    /// Killed and run again with the same ids and selection, it finishes the same request and
    /// rewrites nothing twice. Leaves an audit record (ids hashed) in the bucket.
    Forget {
        #[command(flatten)]
        config: ConfigArgs,
        /// An id to forget, matched against each event's top-level userId and anonymousId
        /// (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// A file of ids, one per line ("-": standard input).
        #[arg(long, value_name = "FILE")]
        ids_file: Option<PathBuf>,
        /// Only objects of this source (repeatable; default: every source). Dead letters have
        /// no source: those of the selected days are always read.
        #[arg(long = "source", value_name = "SOURCE_ID")]
        sources: Vec<String>,
        /// First received-day to read (default: the earliest).
        #[arg(long)]
        from: Option<String>,
        /// Last received-day to read (default: the latest).
        #[arg(long)]
        to: Option<String>,
        /// Read the selection and print what would be rewritten (objects, lines, bytes);
        /// suppress nothing, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop waiting for open batches after this many seconds (exit code 1; the ids stay
        /// suppressed, and the same forget run again goes on). Default: wait as long as it takes.
        #[arg(long, value_name = "SECS")]
        wait_limit: Option<u64>,
        /// Where rewritten objects are written before they are put (default: the system's
        /// temporary directory).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Objects read or rewritten at once.
        #[arg(long, default_value_t = kafka_s3_archiver::forget::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// Finish an unfinished request from its journal in the bucket (its ids and selection
        /// come from there), e.g. one killed whose ids are not at hand.
        #[arg(long, value_name = "REQUEST", conflicts_with_all = ["ids", "ids_file", "sources", "from", "to"])]
        finish: Option<String>,
    },
    /// Show the group's committed offsets against the topic's high watermarks.
    Lag {
        #[command(flatten)]
        config: ConfigArgs,
        /// Wait until every partition is committed up to its high watermark.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (exit code 1).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// mimalloc rather than glibc's allocator: the poll thread allocates every record and the buffer
/// workers free them, and glibc's arena locks turned that hand-off into the bottleneck (the
/// workers waited on `__lll_lock_wait_private` while two cores sat idle; `scripts/bench.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Run(args) => {
            let config = args.load()?;
            // Named so that the uploads' CPU shows apart from the poll thread's and the buffer
            // workers' (bench.sh reads each thread's CPU by name).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("archiver-async")
                .build()
                .context("start async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                let upload_now = Arc::new(UploadNow::default());
                tokio::spawn(upload_on_signal(Arc::clone(&upload_now)));
                kafka_s3_archiver::app::run(config, Metrics::new(), shutdown, upload_now).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce {
            config,
            count,
            rate,
            sources,
            days,
            start_day,
            near_midnight,
            seed,
            minimal,
            pad_bytes,
            partition,
            compression,
        } => {
            let config = config.load()?;
            let start_day = start_day.unwrap_or_else(|| {
                chrono::Utc::now().date_naive() - chrono::Days::new(u64::from(days.max(1)))
            });
            let mut generator = EventGenerator::new(GeneratorSettings {
                sources,
                start_day,
                days,
                near_midnight,
                seed,
                minimal,
                pad_bytes,
            });
            let settings = ProduceSettings {
                kafka: config.kafka.clone(),
                count,
                rate,
                compression,
                partition,
            };
            eprintln!(
                "producing {count} events for {} sources over {days} days from {start_day} to {} at {}",
                generator.sources().len(),
                settings.kafka.topic,
                settings.kafka.brokers
            );
            let summary = produce::produce(&settings, &mut generator, |sent, acked| {
                eprintln!("  sent {sent}, acknowledged {acked}");
            })?;
            let secs = summary.elapsed.as_secs_f64().max(1e-9);
            println!(
                "produced {} events ({:.1} MB) in {:.1}s: {:.0} events/s, {:.1} MB/s",
                summary.events,
                summary.bytes as f64 / 1e6,
                secs,
                summary.events as f64 / secs,
                summary.bytes as f64 / 1e6 / secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            config,
            topic,
            sources,
            from,
            to,
            dead_letter,
            reasons,
            undated,
            key_fields,
            rate,
            max_in_flight_mb,
            dry_run,
            skip_corrupt,
        } => {
            let config = config.load()?;
            let day = |flag: &str, text: &str| {
                restore::plan::parse_day(text).with_context(|| {
                    format!("--{flag} {text:?}: expected a date (2026-11-20) or a day folder of the archive (1763596800000, day=2026-11-20)")
                })
            };
            let (from, to) = (day("from", &from)?, day("to", &to)?);
            anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
            let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
            for reason in &reasons {
                anyhow::ensure!(
                    known.contains(&reason.as_str()),
                    "--reason {reason:?}: not a dead-letter reason ({})",
                    known.join(", ")
                );
            }
            anyhow::ensure!(
                dead_letter || reasons.is_empty(),
                "--reason selects dead letters: add --dead-letter"
            );
            anyhow::ensure!(
                dead_letter || !undated,
                "--undated selects dead letters: add --dead-letter"
            );
            let options = RestoreOptions {
                selection: Selection {
                    archived_topic: config.kafka.topic.clone(),
                    sources: sources.into_iter().collect(),
                    from,
                    to,
                    dead_letter,
                    reasons: reasons.into_iter().collect(),
                    undated,
                },
                target_topic: topic,
                key_fields,
                rate,
                max_in_flight_bytes: max_in_flight_mb.max(1) << 20,
                dry_run,
                skip_corrupt,
            };
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let runtime = tokio::runtime::Runtime::new().context("start async runtime")?;
            let summary = runtime.block_on(restore::restore(&config, &options, move |p| {
                show_progress(p, terminal)
            }))?;
            if terminal {
                eprintln!();
            }
            let secs = summary.elapsed.as_secs_f64().max(1e-9);
            let mb = summary.sent_bytes as f64 / 1e6;
            if dry_run {
                println!(
                    "dry run of restore {}: would send {} events ({mb:.1} MB) from {} objects ({:.1} MB compressed); {} already sent by earlier runs",
                    summary.run,
                    summary.sent,
                    summary.objects,
                    summary.object_bytes as f64 / 1e6,
                    summary.already_sent
                );
            } else {
                println!(
                    "restore {}: sent {} events ({mb:.1} MB) from {} objects in {secs:.1}s: {:.0} events/s, {:.1} MB/s; {} already sent by earlier runs",
                    summary.run,
                    summary.sent,
                    summary.objects,
                    summary.sent as f64 / secs,
                    mb / secs,
                    summary.already_sent
                );
            }
            if summary.left_out > 0 {
                println!(
                    "left out: {} objects of the selection that no batch manifest lists (the log names them)",
                    summary.left_out
                );
            }
            if summary.suppressed > 0 {
                println!(
                    "left out, as lines of suppressed users: {}",
                    summary.suppressed
                );
            }
            if summary.corrupt > 0 {
                println!("skipped as corrupt: {}", summary.corrupt);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let config = args.load()?;
            println!("ok   config: valid");
            let runtime = tokio::runtime::Runtime::new().context("start async runtime")?;
            let results = runtime.block_on(kafka_s3_archiver::check::run_checks(&config));
            for result in &results {
                println!("{}", result.line());
            }
            Ok(if results.iter().all(|r| r.ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify { config, deep, json } => {
            let config = config.load()?;
            let runtime = tokio::runtime::Runtime::new().context("start async runtime")?;
            let report = runtime.block_on(kafka_s3_archiver::verify::verify(&config, deep))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Suppress {
            config,
            ids,
            ids_file,
        } => {
            let config = config.load()?;
            let ids = read_ids(&ids, ids_file.as_deref())?;
            anyhow::ensure!(!ids.is_empty(), "no ids given: use --id or --ids-file");
            let runtime = tokio::runtime::Runtime::new().context("start async runtime")?;
            let (request, key) = runtime.block_on(async {
                let store = kafka_s3_archiver::upload::s3::S3Store::connect(&config.s3).await;
                kafka_s3_archiver::upload::suppression::submit(&store, &config.s3.prefix, &ids)
                    .await
            })?;
            println!(
                "request {}: {} ids added to the suppression list (hashed, s3://{}/{key})",
                request.request,
                ids.len(),
                config.s3.bucket
            );
            println!(
                "every member takes them up within suppression.refresh_secs ({} s), from the next batch of each partition; events already archived stay until they are forgotten",
                config.suppression.refresh_secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget {
            config,
            ids,
            ids_file,
            sources,
            from,
            to,
            dry_run,
            wait_limit,
            work_dir,
            concurrency,
            finish,
        } => {
            let config = config.load()?;
            let ids = read_ids(&ids, ids_file.as_deref())?;
            anyhow::ensure!(
                !ids.is_empty() || finish.is_some(),
                "no ids given: use --id or --ids-file (or --finish REQUEST)"
            );
            let day = |flag: &str, text: Option<String>| {
                text.map(|text| {
                    restore::plan::parse_day(&text).with_context(|| {
                        format!("--{flag} {text:?}: expected a date (2026-11-20) or a day folder of the archive (1763596800000, day=2026-11-20)")
                    })
                })
                .transpose()
            };
            let (from, to) = (day("from", from)?, day("to", to)?);
            if let (Some(from), Some(to)) = (from, to) {
                anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
            }
            for source in &sources {
                kafka_s3_archiver::layout::check_source_id(source)
                    .map_err(|why| anyhow::anyhow!("--source {source:?}: {why}"))?;
            }
            let options = kafka_s3_archiver::forget::ForgetOptions {
                ids,
                selection: kafka_s3_archiver::forget::journal::ForgetSelection {
                    sources: sources.into_iter().collect(),
                    from,
                    to,
                },
                dry_run,
                wait_limit: wait_limit.map(Duration::from_secs),
                work_dir,
                concurrency: concurrency.max(1),
                finish,
            };
            let runtime = tokio::runtime::Runtime::new().context("start async runtime")?;
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let last_progress = std::sync::Mutex::new(None::<Instant>);
            let say = |said: kafka_s3_archiver::forget::Said| {
                show_forget_progress(said, terminal, &last_progress)
            };
            let summary =
                runtime.block_on(kafka_s3_archiver::forget::forget(&config, options, &say));
            if terminal && last_progress.lock().expect("progress lock").is_some() {
                eprintln!();
            }
            let summary = summary?;
            print!("{}", render_forget(&summary, &config.s3.bucket));
            Ok(if summary.left_alone.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Lag {
            config,
            wait,
            timeout,
        } => {
            let config = config.load()?;
            let started = Instant::now();
            let mut rounds = 0u64;
            loop {
                let lags = group_lag(&config)?;
                let total: i64 = lags.iter().map(|l| l.lag()).sum();
                if !wait || total == 0 {
                    println!("partition  committed  end-offset  lag");
                    for lag in &lags {
                        println!(
                            "{:>9}  {:>9}  {:>10}  {:>3}",
                            lag.partition,
                            lag.committed.map_or("-".to_string(), |c| c.to_string()),
                            lag.end_offset,
                            lag.lag()
                        );
                    }
                    println!("total lag: {total}");
                    return Ok(if total == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(2)
                    });
                }
                if started.elapsed() > Duration::from_secs(timeout) {
                    eprintln!("still {total} records behind after {timeout}s");
                    return Ok(ExitCode::FAILURE);
                }
                if rounds % 4 == 0 {
                    eprintln!("waiting: {total} records not yet archived and committed");
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// `forget`'s steps, a line each; its progress as a bar redrawn in place on a terminal (at most
/// ten times a second), otherwise a line every few seconds.
fn show_forget_progress(
    said: kafka_s3_archiver::forget::Said,
    terminal: bool,
    last_progress: &std::sync::Mutex<Option<Instant>>,
) {
    use kafka_s3_archiver::forget::Said;
    let mut last = last_progress.lock().expect("progress lock");
    match said {
        Said::Step(line) => {
            if terminal && last.take().is_some() {
                eprintln!();
            }
            eprintln!("forget: {line}");
        }
        Said::Progress { done, total, what } => {
            let every = Duration::from_millis(if terminal { 100 } else { 3000 });
            let finished = done >= total;
            if !finished && last.is_some_and(|at| at.elapsed() < every) {
                return;
            }
            *last = Some(Instant::now());
            if terminal {
                let share = done as f64 / total.max(1) as f64;
                eprint!("\r{} {done}/{total} objects {what}   ", bar(share));
            } else {
                eprintln!("forget: {done}/{total} objects {what}");
            }
        }
    }
}

/// A progress bar thirty characters wide, `share` of it filled.
fn bar(share: f64) -> String {
    let filled = ((share * 30.0).round() as usize).min(30);
    format!("[{}{}]", "#".repeat(filled), " ".repeat(30 - filled))
}

/// A restore's progress: a bar redrawn in place on a terminal, a log line otherwise.
fn show_progress(progress: &Progress, terminal: bool) {
    let secs = progress.elapsed.as_secs_f64().max(1e-3);
    let eta = progress
        .eta()
        .map_or("-".to_string(), |eta| format!("{}s", eta.as_secs()));
    let share = if progress.compressed_total == 0 {
        1.0
    } else {
        progress.compressed_read as f64 / progress.compressed_total as f64
    };
    if terminal {
        eprint!(
            "\r{} {}/{} objects, {} events, {:.1} MB/s, ETA {eta}   ",
            bar(share),
            progress.objects_done,
            progress.objects,
            progress.sent,
            progress.sent_bytes as f64 / 1e6 / secs,
        );
    } else {
        tracing::info!(
            objects_done = progress.objects_done,
            objects = progress.objects,
            events_sent = progress.sent,
            mb_per_sec = format!("{:.1}", progress.sent_bytes as f64 / 1e6 / secs),
            eta = %eta,
            "restoring"
        );
    }
}

/// Asks for an upload of everything buffered at each SIGUSR1.
async fn upload_on_signal(upload_now: Arc<UploadNow>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1()).expect("install SIGUSR1 handler");
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1 received: uploading what is buffered now");
            upload_now.request();
        }
    }
    #[cfg(not(unix))]
    drop(upload_now);
}

/// Cancels `shutdown` on SIGTERM (Kubernetes) or Ctrl-C.
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

/// Ids from `--id` and `--ids-file` ("-": standard input), hashed at once.
fn read_ids(
    ids: &[String],
    ids_file: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeSet<kafka_s3_archiver::suppress::IdHash>> {
    let text = match ids_file {
        Some(path) if path.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("read ids from stdin")?
        }
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("read ids from {}", path.display()))?,
        None => String::new(),
    };
    let lines = ids.iter().map(String::as_str).chain(text.lines());
    Ok(kafka_s3_archiver::suppress::parse_ids(lines))
}

/// What `forget` did, for its operator.
fn render_forget(summary: &kafka_s3_archiver::forget::ForgetSummary, bucket: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verb = if summary.dry_run {
        "would rewrite"
    } else {
        "rewrote"
    };
    let _ = writeln!(
        out,
        "forget request {}{}",
        summary.request,
        if summary.resumed { " (resumed)" } else { "" }
    );
    if !summary.resumed {
        let _ = writeln!(
            out,
            "read {} of {} objects in the selection ({} bytes)",
            summary.objects_read, summary.objects_in_selection, summary.bytes_read
        );
    }
    let _ = writeln!(
        out,
        "{verb} {} objects: {} lines ({} uncompressed bytes) of the users taken out",
        summary.objects_holding, summary.lines_removed, summary.uncompressed_bytes_removed
    );
    if !summary.dry_run {
        let _ = writeln!(
            out,
            "put {} objects ({} found rewritten by an earlier run), updated {} batch manifests",
            summary.objects_rewritten, summary.objects_already_rewritten, summary.manifests_updated
        );
        if summary.versions_deleted > 0 {
            let _ = writeln!(
                out,
                "deleted {} earlier versions of rewritten objects",
                summary.versions_deleted
            );
        }
    }
    for waiting in &summary.waiting {
        let _ = writeln!(out, "not read yet, {waiting}");
    }
    for why in &summary.left_alone {
        let _ = writeln!(out, "left alone: {why}");
    }
    if let Some(key) = &summary.audit_key {
        let _ = writeln!(out, "audit record: s3://{bucket}/{key}");
    }
    out
}
