#!/usr/bin/env bash
# Throughput benchmark of the archiver against baselines measured in the same run, on the same
# data: single-core gzip -6 and zlib-rs (the compression limit), a plain consumer draining the
# topic (the broker limit), a consumer piped into gzip -6 (the naive pipeline), and a plain
# uploader putting the archived objects again (the upload tail's limit). Prints one table and,
# last, one line of ratios. See BENCHMARKS.md.
#
#   scripts/bench.sh            1,000,000 events (~1 GB), 8 partitions, 100 sources x 2 days
#   scripts/bench.sh --quick    100,000 events, for a run under two minutes
# then the archiver again with zstd objects, without the id index, with a 100,000-id
# suppression list, the restore of the whole archive into another topic, `forget` of 1 and of
# 1,000 users against a baseline that downloads, decompresses and recompresses every object,
# then memory benchmarks: 64 partitions x 100 sources x 2 days = 12,800 files open at once, and
# 300 events of 0.9 MB.
#   options: --events N --partitions N --sources N --days N --seed N --keep (keep the work dir)
#            --buffers DIR: the archiver's buffers under DIR instead of the work dir, to measure
#            them on another volume (a journaled ext4 or XFS, as Kubernetes nodes have: see
#            BENCHMARKS.md for why the file system matters)
#   scripts/bench.sh --scaling  how cost grows instead (a few minutes): the archiver alone as
#                               partitions per member grow (1, 4, 16, 64; 100 sources x 2 days
#                               each) and as open files per partition grow (10, 100, 1,000
#                               sources x 1 day; 4 partitions); a table and SCALING.png;
#                               SCALING_RUNS="partitions:64" runs only the runs named
#   scripts/bench.sh --memory   the memory benchmark with 12,800 files open alone (under a minute)
#
# Servers: tansu (Kafka protocol, memory storage) and Garage (S3 API, disk-backed: the bucket
# does not sit in RAM), both installed and cached by scripts/lib/rig.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/rig.sh

EVENTS=1000000 PARTITIONS=8 SOURCES=100 DAYS=2 SEED=42 KEEP=0 SCALING=0 MEMORY_ONLY=0 BUFFERS_DIR=
# The memory benchmark: this many partitions x SOURCES x DAYS files open at once.
WIDE_PARTITIONS=64 WIDE_EVENTS=300000
# And large events: this many of 0.9 MB (a producer's default message.max.bytes is 1 MB).
LARGE_EVENTS=300 LARGE_PARTITIONS=4 LARGE_BYTES=900000
while (($#)); do
  case $1 in
    --quick) EVENTS=100000 WIDE_EVENTS=150000 ;;
    --events) EVENTS=$2; shift ;;
    --partitions) PARTITIONS=$2; shift ;;
    --sources) SOURCES=$2; shift ;;
    --days) DAYS=$2; shift ;;
    --seed) SEED=$2; shift ;;
    --keep) KEEP=1 ;;
    --buffers) BUFFERS_DIR=$2; shift ;;
    --scaling) SCALING=1 ;;
    --memory) MEMORY_ONLY=1 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
TOPIC=segment-events BUCKET=bench-archive
step() { log "[${SECONDS}s] $*"; }

ensure_tansu
ensure_python_tools
ensure_garage
step "building release binaries"
cargo build --release --quiet --bin kafka-s3-archiver --example bench_baseline
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/release/kafka-s3-archiver"
BASELINE="$TARGET_DIR/release/examples/bench_baseline"

# On disk next to the build, not in a tmpfs: the archiver's buffers and Garage's data are part
# of what is measured.
RIG_DIR=$(mktemp -d "$TARGET_DIR/bench.XXXXXX")
RIG_DIR=$(cd "$RIG_DIR" && pwd)
if [[ -n "$BUFFERS_DIR" ]]; then
  mkdir -p "$BUFFERS_DIR"
  BUFFERS_DIR=$(mktemp -d "$(cd "$BUFFERS_DIR" && pwd)/bench-buffers.XXXXXX")
else
  BUFFERS_DIR=$RIG_DIR
fi
log "archiver buffers: $BUFFERS_DIR ($(df --output=fstype "$BUFFERS_DIR" | tail -1))"
RIG_PIDS=()
ARCHIVER_PID=""
cleanup() {
  [[ -n "$ARCHIVER_PID" ]] && kill -9 "$ARCHIVER_PID" 2>/dev/null || true
  stop_rig
  wait 2>/dev/null || true
  if ((KEEP)); then log "work dir kept: $RIG_DIR"; else rm -rf "$RIG_DIR" "$BUFFERS_DIR"; fi
}
trap cleanup EXIT

start_tansu
start_garage "$RIG_DIR/garage" "$BUCKET"
"$TANSU_BIN" topic create "$TOPIC" --partitions "$PARTITIONS" --broker "tcp://$KAFKA_BROKERS" >/dev/null

# tansu answers a fetch only when fetch.wait.max.ms runs out, even with data waiting (Kafka
# answers at once): with librdkafka's 500 ms default a consumer reads 1 MB per partition per
# half second. Every consumer here, baselines and archiver alike, waits 10 ms instead.
FETCH_WAIT_MS=10
export BENCH_CONSUMER_PROPERTIES="fetch.wait.max.ms=$FETCH_WAIT_MS"
cat >"$RIG_DIR/archiver.toml" <<TOML
[kafka]
brokers = "$KAFKA_BROKERS"
topic = "$TOPIC"
group_id = "bench-archiver"
# tansu drops offset-commit metadata, where batch intents live (README, "Exactly once").
exactly_once = "best-effort"

[kafka.properties]
"fetch.wait.max.ms" = "$FETCH_WAIT_MS"

[s3]
bucket = "$BUCKET"
endpoint_url = "$S3_ENDPOINT"
force_path_style = true

[buffer]
data_dir = "$RIG_DIR/buffers"

# Once a day: the run ends with SIGUSR1 ("upload now") once everything is read, as the hourly
# upload would, instead of waiting for a scheduled slot.
[schedule]
interval_secs = 86400
offset_secs = 0
TOML
export ARCHIVER_KAFKA_BROKERS="$KAFKA_BROKERS"
METRICS_PORT=$(free_port)
export ARCHIVER_METRICS_LISTEN="127.0.0.1:$METRICS_PORT"
export AWS_EC2_METADATA_DISABLED=true RUST_LOG=${RUST_LOG:-warn}

now() { date +%s.%N; }
# The CPU seconds of process $1's threads, by stage, and its page faults: where the archiver's
# CPU goes, read from /proc before it exits (the threads are named: kafka-poll, buffer-N,
# archiver-async for the uploads and the blocking pool, rdk:* for librdkafka's own).
thread_cpu() {
  python3 - "$1" <<'PY'
import os, sys
pid, tick = sys.argv[1], os.sysconf("SC_CLK_TCK")
stages = {"poll": 0, "buffer workers": 0, "uploads and blocking pool": 0, "librdkafka": 0, "other": 0}
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    except OSError:
        continue
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    seconds = (int(fields[11]) + int(fields[12])) / tick
    stage = ("poll" if name == "kafka-poll" else "buffer workers" if name.startswith("buffer-")
             else "uploads and blocking pool" if name.startswith("archiver-async")
             else "librdkafka" if name.startswith("rdk:") else "other")
    stages[stage] += seconds
faults = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])
print(", ".join(f"{stage} {seconds:.2f}" for stage, seconds in stages.items())
      + f" CPU-s; {faults} page faults")
PY
}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
# Runs the archiver on topic $1 ($2 partitions, $3 events) with group $4 until everything is
# committed: reads until every record is written to the buffers, then SIGUSR1 (upload now).
# Sets read_seconds, archiver_seconds, cpu_seconds, read_rss_kb, peak_rss_kb, open_files,
# seal_seconds (sealing the batches, summed over the buffer workers) and threads_cpu (the CPU
# by stage).
run_archiver() {
  local topic=$1 partitions=$2 events=$3 group=$4 start waiter utime stime
  start=$(now)
  ARCHIVER_KAFKA_TOPIC=$topic ARCHIVER_KAFKA_GROUP_ID=$group \
    ARCHIVER_BUFFER_DATA_DIR="$BUFFERS_DIR/buffers-$group" \
    "$BIN" run --config "$RIG_DIR/archiver.toml" >"$RIG_DIR/$group.log" 2>&1 &
  ARCHIVER_PID=$!
  "$BASELINE" wait-metric "$METRICS_PORT" archiver_records_written_total "$events" &
  waiter=$!
  wait -n "$waiter" "$ARCHIVER_PID" || true
  if ! kill -0 "$ARCHIVER_PID" 2>/dev/null; then
    echo "the archiver stopped:" >&2; tail -20 "$RIG_DIR/$group.log" >&2; exit 1
  fi
  read_seconds=$(python3 -c "print($(now) - $start)")
  read_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$ARCHIVER_PID/status")
  open_files=$("$BASELINE" metric "$METRICS_PORT" archiver_open_files)
  kill -USR1 "$ARCHIVER_PID"
  "$BASELINE" committed "$KAFKA_BROKERS" "$topic" "$partitions" "$group" "$events" >/dev/null
  archiver_seconds=$(python3 -c "print($(now) - $start)")
  seal_seconds=$("$BASELINE" metric "$METRICS_PORT" archiver_seal_duration_seconds_sum)
  read -r utime stime < <(awk '{print $14, $15}' "/proc/$ARCHIVER_PID/stat")
  cpu_seconds=$(python3 -c "import os; print(($utime + $stime) / os.sysconf('SC_CLK_TCK'))")
  peak_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$ARCHIVER_PID/status")
  threads_cpu=$(thread_cpu "$ARCHIVER_PID")
  log "archiver CPU by thread: $threads_cpu"
  kill -TERM "$ARCHIVER_PID"
  wait "$ARCHIVER_PID" || { echo "the archiver did not exit cleanly:" >&2; tail -20 "$RIG_DIR/$group.log" >&2; exit 1; }
  ARCHIVER_PID=""
}

# The memory benchmark with 12,800 files open; sets the run_archiver figures.
memory_wide() {
  WIDE_TOPIC=segment-events-wide
  step "memory: $WIDE_PARTITIONS partitions x $SOURCES sources x $DAYS days, $WIDE_EVENTS events"
  "$TANSU_BIN" topic create "$WIDE_TOPIC" --partitions "$WIDE_PARTITIONS" --broker "tcp://$KAFKA_BROKERS" >/dev/null
  ARCHIVER_KAFKA_TOPIC=$WIDE_TOPIC "$BIN" produce --count "$WIDE_EVENTS" --sources "$SOURCES" \
    --days "$DAYS" --start-day 2026-11-20 --seed "$SEED" >/dev/null
  run_archiver "$WIDE_TOPIC" "$WIDE_PARTITIONS" "$WIDE_EVENTS" bench-wide
}

if ((MEMORY_ONLY)); then
  memory_wide
  echo "memory: $WIDE_EVENTS events over $WIDE_PARTITIONS partitions, $open_files files open at once;" \
    "peak RSS $((read_rss_kb / 1024)) MB with all of them open, $((peak_rss_kb / 1024)) MB through sealing" \
    "and uploading them (target <= 300 MB)"
  exit 0
fi

if ((SCALING)); then
  # One row per run: label, partitions, sources x days, MB, seconds, CPU seconds, peak RSS kB,
  # objects. Every run is checked by verify --deep like the main one.
  SCALING_EVENTS=${SCALING_EVENTS:-100000}
  : >"$RIG_DIR/scaling.tsv"
  scale_run() { # axis partitions sources days
    local axis=$1 partitions=$2 sources=$3 days=$4 topic mb objects
    topic="scale-$axis-p$partitions-s$sources"
    step "scaling: $partitions partitions, $sources sources x $days days, $SCALING_EVENTS events"
    "$TANSU_BIN" topic create "$topic" --partitions "$partitions" --broker "tcp://$KAFKA_BROKERS" >/dev/null
    mb=$(ARCHIVER_KAFKA_TOPIC=$topic "$BIN" produce --count "$SCALING_EVENTS" --sources "$sources" \
      --days "$days" --start-day 2026-11-20 --seed "$SEED" | sed -n 's/^produced .* events (\([0-9.]*\) MB).*/\1/p')
    ARCHIVER_S3_PREFIX="$topic/" run_archiver "$topic" "$partitions" "$SCALING_EVENTS" "bench-$topic"
    ARCHIVER_KAFKA_TOPIC=$topic ARCHIVER_KAFKA_GROUP_ID="bench-$topic" ARCHIVER_S3_PREFIX="$topic/" \
      "$BIN" verify --deep --config "$RIG_DIR/archiver.toml" >"$RIG_DIR/verify-$topic.txt" 2>&1 \
      || { cat "$RIG_DIR/verify-$topic.txt" >&2; exit 1; }
    objects=$(s3 s3 ls --recursive "s3://$BUCKET/$topic/segment-logs/" | awk '$4 !~ /\/_/' | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$axis" "$partitions" "$sources" "$days" "$mb" \
      "$archiver_seconds" "$cpu_seconds" "$peak_rss_kb" "$objects" >>"$RIG_DIR/scaling.tsv"
  }
  # SCALING_RUNS="partitions:64 sources:1000" runs only those (to profile one, say).
  SCALING_RUNS=${SCALING_RUNS:-partitions:1 partitions:4 partitions:16 partitions:64 sources:10 sources:100 sources:1000}
  for run in $SCALING_RUNS; do
    case $run in
      partitions:*) scale_run partitions "${run#*:}" 100 2 ;;
      sources:*) scale_run sources 4 "${run#*:}" 1 ;;
      *) echo "SCALING_RUNS: unknown run $run (partitions:N or sources:N)" >&2; exit 2 ;;
    esac
  done
  # What a plain PUT of the widest run's objects costs in CPU on this machine, in the same run:
  # the floor of the archiver's cost per object (it sends a HEAD and a PUT an object).
  widest=$(awk -F'\t' '$1 == "partitions" {print $2}' "$RIG_DIR/scaling.tsv" | sort -n | tail -1)
  if [[ -n "$widest" ]]; then
    step "plain uploader: the $widest-partition run's objects PUT again"
    s3 s3 sync --only-show-errors --exclude "_*" --exclude "*/_*" "s3://$BUCKET/scale-partitions-p$widest-s100/segment-logs/" \
      "$RIG_DIR/objects/"
    "$BASELINE" put "$S3_ENDPOINT" "$BUCKET" plain-upload/ "${ARCHIVER_S3_CONCURRENCY:-8}" "$RIG_DIR/objects" \
      >"$RIG_DIR/put.json"
    rm -rf "$RIG_DIR/objects"
    export PLAIN_PUT_MS
    PLAIN_PUT_MS=$(python3 -c "import json; p = json.load(open('$RIG_DIR/put.json')); print(1000 * p['cpu_seconds'] / max(p['objects'], 1))")
  fi
  ensure_chart_tools
  "$CHART_PYTHON" scripts/lib/scaling_chart.py "$RIG_DIR/scaling.tsv" SCALING.png "$SCALING_EVENTS"
  exit 0
fi

step "producing $EVENTS events ($SOURCES sources x $DAYS days) into $PARTITIONS partitions"
start=$(now)
ARCHIVER_KAFKA_TOPIC=$TOPIC "$BIN" produce --count "$EVENTS" --sources "$SOURCES" --days "$DAYS" --start-day 2026-11-20 \
  --seed "$SEED" >/dev/null
produce_seconds=$(python3 -c "print($(now) - $start)")

step "reading the topic back as NDJSON (the bytes every stage works on)"
"$BASELINE" drain "$KAFKA_BROKERS" "$TOPIC" "$PARTITIONS" "$EVENTS" --lines \
  >"$RIG_DIR/events.ndjson" 2>"$RIG_DIR/dump.json"
BYTES=$(stat -c %s "$RIG_DIR/events.ndjson")

step "compression limit: gzip -6 and zlib-rs level 6, one core each"
start=$(now)
gzip -6 -c "$RIG_DIR/events.ndjson" >"$RIG_DIR/gzip6.gz"
gzip_seconds=$(python3 -c "print($(now) - $start)")
gzip_bytes=$(stat -c %s "$RIG_DIR/gzip6.gz")
"$BASELINE" zlib "$RIG_DIR/events.ndjson" 6 >"$RIG_DIR/zlib.json"
zlib_seconds=$(json seconds <"$RIG_DIR/zlib.json")
zlib_bytes=$(json compressed <"$RIG_DIR/zlib.json")
zlib_cpu=$(json cpu_seconds <"$RIG_DIR/zlib.json")

step "broker drain: a plain consumer reading to nowhere"
"$BASELINE" drain "$KAFKA_BROKERS" "$TOPIC" "$PARTITIONS" "$EVENTS" >"$RIG_DIR/drain.json"
drain_seconds=$(json seconds <"$RIG_DIR/drain.json")

step "naive pipeline: consumer | gzip -6"
start=$(now)
"$BASELINE" drain "$KAFKA_BROKERS" "$TOPIC" "$PARTITIONS" "$EVENTS" --lines 2>/dev/null \
  | gzip -6 >"$RIG_DIR/naive.gz"
naive_seconds=$(python3 -c "print($(now) - $start)")
naive_bytes=$(stat -c %s "$RIG_DIR/naive.gz")

step "archiver: from start to everything uploaded and committed"
run_archiver "$TOPIC" "$PARTITIONS" "$EVENTS" bench-archiver
# The same compressor again right after: on these shared machines one measurement of the same
# work moved by a third from one run to the next, and the CPU ratio is read against the mean of
# the two taken around the archiver.
step "compression limit again: zlib-rs level 6, one core, right after the archiver"
"$BASELINE" zlib "$RIG_DIR/events.ndjson" 6 >"$RIG_DIR/zlib-after.json"
zlib_cpu_after=$(json cpu_seconds <"$RIG_DIR/zlib-after.json")
rm -f "$RIG_DIR/events.ndjson"

step "checking the bucket: manifests, committed offsets, every object decoded, every messageId once"
ARCHIVER_KAFKA_TOPIC=$TOPIC "$BIN" verify --deep --config "$RIG_DIR/archiver.toml" >"$RIG_DIR/verify.txt" 2>&1 || { cat "$RIG_DIR/verify.txt" >&2; exit 1; }
archived_bytes=$(s3 s3 ls --recursive "s3://$BUCKET/segment-logs/" \
  | awk '$4 !~ /^segment-logs\/_/ {sum += $3} END {print sum + 0}')
objects=$(s3 s3 ls --recursive "s3://$BUCKET/segment-logs/" | awk '$4 !~ /^segment-logs\/_/' | wc -l)

throughput_seconds=$archiver_seconds throughput_read=$read_seconds throughput_cpu=$cpu_seconds
throughput_rss=$peak_rss_kb throughput_threads=$threads_cpu throughput_seal=$seal_seconds

# The upload tail's limit is the store's PUT rate on this machine, not the archiver alone: a plain
# uploader puts the same objects to the same store at the archiver's concurrency, and the tail is
# measured against it.
step "plain uploader: the archived objects PUT again, at the archiver's concurrency"
UPLOAD_CONCURRENCY=${ARCHIVER_S3_CONCURRENCY:-8}
s3 s3 sync --only-show-errors --exclude "*" --include "*/$TOPIC-[0-9]*" --exclude "_*" \
  "s3://$BUCKET/segment-logs/" "$RIG_DIR/objects/"
"$BASELINE" put "$S3_ENDPOINT" "$BUCKET" plain-upload/ "$UPLOAD_CONCURRENCY" "$RIG_DIR/objects" \
  >"$RIG_DIR/put.json"
put_seconds=$(json seconds <"$RIG_DIR/put.json")
put_objects=$(json objects <"$RIG_DIR/put.json")
put_cpu=$(json cpu_seconds <"$RIG_DIR/put.json")
rm -rf "$RIG_DIR/objects"

step "archiver again, with zstd objects (level 3), under the prefix zstd/"
ARCHIVER_OUTPUT_COMPRESSION=zstd ARCHIVER_S3_PREFIX=zstd/ \
  run_archiver "$TOPIC" "$PARTITIONS" "$EVENTS" bench-archiver-zstd
zstd_seconds=$archiver_seconds zstd_cpu=$cpu_seconds zstd_rss=$peak_rss_kb
zstd_bytes=$(s3 s3 ls --recursive "s3://$BUCKET/zstd/segment-logs/" \
  | awk '$4 !~ /^zstd\/segment-logs\/_/ {sum += $3} END {print sum + 0}')

# What finding users costs the archiver: the id index on and a 100,000-id suppression list
# (none of these events' users) against neither, each twice in the order A B B A. Each run's
# file creations cost more than the last one's (ext4 without a journal checks the inodes the
# runs before deleted), a drift as large as the difference sought: the order cancels it.
python3 -c "print('\n'.join(f'gone-{n}' for n in range(100000)))" >"$RIG_DIR/suppressed-ids.txt"
neither_run() {  # $1: prefix
  step "archiver again, without the id index, under the prefix $1"
  ARCHIVER_OUTPUT_ID_INDEX=false ARCHIVER_S3_PREFIX=$1 \
    run_archiver "$TOPIC" "$PARTITIONS" "$EVENTS" "bench-archiver-${1%/}"
}
both_run() {  # $1: prefix
  step "archiver again, with the id index and a 100,000-id suppression list, under the prefix $1"
  ARCHIVER_S3_PREFIX=$1 "$BIN" suppress --config "$RIG_DIR/archiver.toml" \
    --ids-file "$RIG_DIR/suppressed-ids.txt" >/dev/null
  ARCHIVER_S3_PREFIX=$1 run_archiver "$TOPIC" "$PARTITIONS" "$EVENTS" "bench-archiver-${1%/}"
}
neither_run unindexed/
unindexed_seconds=$archiver_seconds unindexed_cpu=$cpu_seconds unindexed_rss=$peak_rss_kb
both_run suppressed/
suppressing_seconds=$archiver_seconds suppressing_cpu=$cpu_seconds suppressing_rss=$peak_rss_kb
both_run suppressed-again/
suppressing_cpu_again=$cpu_seconds
neither_run unindexed-again/
unindexed_cpu_again=$cpu_seconds
suppressing_bytes=$(s3 s3 ls --recursive "s3://$BUCKET/suppressed/segment-logs/" \
  | awk '$4 !~ /^suppressed\/segment-logs\/_/ {sum += $3} END {print sum + 0}')

RESTORED_TOPIC=segment-events-restored
step "restore: the whole archive back into a topic of $PARTITIONS partitions"
"$TANSU_BIN" topic create "$RESTORED_TOPIC" --partitions "$PARTITIONS" --broker "tcp://$KAFKA_BROKERS" >/dev/null
last_day=$(python3 -c "import datetime; print(datetime.date(2026, 11, 20) + datetime.timedelta(days=$DAYS))")  # events near the last midnight spill over
start=$(now)
ARCHIVER_KAFKA_TOPIC=$TOPIC "$BIN" restore --config "$RIG_DIR/archiver.toml" --topic "$RESTORED_TOPIC" \
  --from 2026-11-20 --to "$last_day" >"$RIG_DIR/restore.txt" 2>"$RIG_DIR/restore.log" \
  || { cat "$RIG_DIR/restore.txt" "$RIG_DIR/restore.log" >&2; exit 1; }
restore_seconds=$(python3 -c "print($(now) - $start)")
restored=$(sed -n 's/.*: sent \([0-9]*\) events.*/\1/p' "$RIG_DIR/restore.txt")
[[ "$restored" == "$EVENTS" ]] || { echo "restore sent $restored of $EVENTS events:" >&2; cat "$RIG_DIR/restore.txt" >&2; exit 1; }

memory_wide

LARGE_TOPIC=segment-events-large
step "memory: $LARGE_EVENTS events of $LARGE_BYTES bytes over $LARGE_PARTITIONS partitions"
"$TANSU_BIN" topic create "$LARGE_TOPIC" --partitions "$LARGE_PARTITIONS" --broker "tcp://$KAFKA_BROKERS" >/dev/null
ARCHIVER_KAFKA_TOPIC=$LARGE_TOPIC "$BIN" produce --count "$LARGE_EVENTS" --pad-bytes "$LARGE_BYTES" \
  --sources 4 --days 1 --start-day 2026-11-20 --seed "$SEED" >/dev/null
wide_read_rss_kb=$read_rss_kb wide_peak_rss_kb=$peak_rss_kb wide_open_files=$open_files
run_archiver "$LARGE_TOPIC" "$LARGE_PARTITIONS" "$LARGE_EVENTS" bench-large
large_read_rss_kb=$read_rss_kb large_peak_rss_kb=$peak_rss_kb

# forget over the archive: the generator draws users user-0 .. user-49999, so one user is in
# about 20 of a million events, and 1,000 users in about 20,000. The baseline does what forget
# would without its index: downloads, decompresses and recompresses every object. Last: forget
# puts its users on the prefix's suppression list, which every later run there would take up.
forget_run() {  # $1: ids file, $2: label; sets forget_seconds, forget_read, forget_selection
  local start out
  start=$(now)
  out=$(ARCHIVER_KAFKA_TOPIC=$TOPIC ARCHIVER_SUPPRESSION_REFRESH_SECS=1 "$BIN" forget \
    --config "$RIG_DIR/archiver.toml" --ids-file "$1" 2>"$RIG_DIR/forget-$2.log") \
    || { echo "$out" "$(tail -20 "$RIG_DIR/forget-$2.log")" >&2; exit 1; }
  forget_seconds=$(python3 -c "print($(now) - $start)")
  echo "$out" >"$RIG_DIR/forget-$2.txt"
  forget_read=$(sed -n 's/^read \([0-9]*\) of \([0-9]*\) objects.*/\1/p' <<<"$out")
  forget_selection=$(sed -n 's/^read \([0-9]*\) of \([0-9]*\) objects.*/\2/p' <<<"$out")
}
step "forget: 1 user, then 1,000 users, out of the whole archive (archiver stopped: no wait)"
echo user-12345 >"$RIG_DIR/forget-1.txt.ids"
forget_run "$RIG_DIR/forget-1.txt.ids" one
forget_one_seconds=$forget_seconds forget_one_read=$forget_read forget_one_selection=$forget_selection
python3 -c "print('\n'.join(f'user-{n}' for n in range(1000)))" >"$RIG_DIR/forget-1000.txt.ids"
forget_run "$RIG_DIR/forget-1000.txt.ids" thousand
forget_many_seconds=$forget_seconds forget_many_read=$forget_read forget_many_selection=$forget_selection
step "forget baseline: download, decompress and recompress every object (gzip -6, 1 core)"
start=$(now)
# The main topic's objects only (the memory runs archived theirs under the same prefix).
s3 s3 sync --only-show-errors --exclude "*" --include "*/$TOPIC-[0-9]*" --exclude "_*" \
  "s3://$BUCKET/segment-logs/" "$RIG_DIR/forget-baseline/"
find "$RIG_DIR/forget-baseline" -name '*.gz' -print0 | xargs -0 -n 50 sh -c 'for f; do gzip -dc "$f" | gzip -6 >/dev/null; done' sh
forget_baseline_seconds=$(python3 -c "print($(now) - $start)")
ARCHIVER_KAFKA_TOPIC=$TOPIC "$BIN" verify --deep --config "$RIG_DIR/archiver.toml" >"$RIG_DIR/verify-forget.txt" 2>&1 \
  || { cat "$RIG_DIR/verify-forget.txt" >&2; exit 1; }

python3 - <<PY
events, size = $EVENTS, $BYTES
mb = size / 1e6
rows = [
    ("gzip -6, 1 core", $gzip_seconds, None, None, $gzip_bytes),
    ("zlib-rs level 6 (archiver's backend), 1 core", $zlib_seconds, $zlib_cpu, None, $zlib_bytes),
    ("broker drain (plain consumer, no output)", $drain_seconds, None, None, None),
    ("naive: consumer | gzip -6", $naive_seconds, None, None, $naive_bytes),
    ("archiver: start to all committed", $throughput_seconds, $throughput_cpu, $throughput_rss, $archived_bytes),
    ("archiver, zstd objects (level 3)", $zstd_seconds, $zstd_cpu, $zstd_rss, $zstd_bytes),
    ("archiver, without the id index", $unindexed_seconds, $unindexed_cpu, $unindexed_rss, None),
    ("archiver, id index + 100,000-id list", $suppressing_seconds, $suppressing_cpu, $suppressing_rss, $suppressing_bytes),
    ("restore: archive back into a topic", $restore_seconds, None, None, None),
]
print()
print(f"kafka-s3-archiver benchmark: {events} events, {mb:.1f} MB NDJSON, $PARTITIONS partitions, "
      f"$SOURCES sources x $DAYS days (produced in {$produce_seconds:.1f} s)")
print("broker: tansu $TANSU_VERSION (memory); S3: Garage $GARAGE_VERSION (disk); "
      f"{__import__('os').cpu_count()} cores")
print()
header = f"{'stage':<46} {'seconds':>8} {'MB/s':>7} {'events/s':>9} {'CPU-s/GB':>9} {'peak RSS MB':>12} {'output MB':>10}"
print(header)
print("-" * len(header))
for name, seconds, cpu, rss, out in rows:
    cells = [f"{name:<46}", f"{seconds:8.2f}", f"{mb / seconds:7.1f}", f"{events / seconds:9.0f}",
             f"{cpu / (size / 1e9):9.1f}" if cpu is not None else f"{'':>9}",
             f"{rss / 1024:12.0f}" if rss is not None else f"{'':>12}",
             f"{out / 1e6:10.1f}" if out is not None else f"{'':>10}"]
    print(" ".join(cells))
print()
print(f"archiver: read everything in {$throughput_read:.2f} s, then uploaded and committed the rest "
      f"in {$throughput_seconds - $throughput_read:.2f} s; {$objects} objects; sealing the batches (files "
      f"finished and fsynced) took {$throughput_seal:.2f} s summed over the buffer workers")
print("archiver CPU by thread: $throughput_threads")
print(f"plain uploader: {$put_objects} objects in {$put_seconds:.2f} s, "
      f"{1000 * $put_cpu / max($put_objects, 1):.2f} ms of CPU a PUT (the archiver sends two requests an "
      f"object: a HEAD of its batch's manifest, then the PUT)")
print(f"memory: {$WIDE_EVENTS} events over $WIDE_PARTITIONS partitions, {int(float('$wide_open_files'))} files open "
      f"at once; peak RSS {$wide_read_rss_kb / 1024:.0f} MB with all of them open, {$wide_peak_rss_kb / 1024:.0f} MB "
      f"through sealing and uploading them (target <= 300 MB)")
print(f"memory, large events: {$LARGE_EVENTS} events of {$LARGE_BYTES / 1e6:.1f} MB "
      f"({$LARGE_EVENTS * $LARGE_BYTES / 1e6:.0f} MB) over $LARGE_PARTITIONS partitions; peak RSS "
      f"{$large_read_rss_kb / 1024:.0f} MB reading them, {$large_peak_rss_kb / 1024:.0f} MB through "
      f"sealing and uploading them (target <= 300 MB: memory is bounded in bytes, not records)")
rate = lambda s: mb / s
archiver = rate($throughput_seconds)
tail_seconds = $throughput_seconds - $throughput_read
print()
compressor_cpu = ($zlib_cpu + $zlib_cpu_after) / 2
print(f"ratios: archiver CPU / compressor CPU = {$throughput_cpu / compressor_cpu:.2f} (target <= 1.30; "
      f"{$throughput_cpu:.2f} CPU-s against the compressor's {$zlib_cpu:.2f} before and {$zlib_cpu_after:.2f} after); "
      f"upload tail / plain uploader = {tail_seconds / $put_seconds:.2f} (target <= 1.20; {tail_seconds:.2f} s "
      f"against {$put_seconds:.2f} s for {$put_objects} objects, $UPLOAD_CONCURRENCY at a time); archiver / naive = "
      f"{archiver / rate($naive_seconds):.2f} (target >= 1.00); archived size / gzip -6 size = "
      f"{$archived_bytes / $gzip_bytes:.3f} (target <= 1.02); restore / archiver = "
      f"{rate($restore_seconds) / archiver:.2f}")
print(f"zstd objects / gzip objects: size {$zstd_bytes / $archived_bytes:.3f}, "
      f"archiver CPU {$zstd_cpu / $throughput_cpu:.2f}, end to end {$throughput_seconds / $zstd_seconds:.2f} x as fast")
print(f"finding users: archiver CPU with the id index and a 100,000-id suppression list / with neither = "
      f"{($suppressing_cpu + $suppressing_cpu_again) / ($unindexed_cpu + $unindexed_cpu_again):.3f} "
      f"(target <= 1.03; runs in the order neither, both, both, neither: "
      f"{$unindexed_cpu:.2f}, {$suppressing_cpu:.2f}, {$suppressing_cpu_again:.2f}, {$unindexed_cpu_again:.2f} CPU-s); "
      f"peak RSS {$suppressing_rss / $unindexed_rss:.2f}")
compressed_mb = $archived_bytes / 1e6
print(f"forget, 1 user: read {$forget_one_read} of {$forget_one_selection} objects "
      f"({$forget_one_read / max($forget_one_selection, 1):.1%}, target <= 5 %) in {$forget_one_seconds:.1f} s; "
      f"1,000 users: read {$forget_many_read} of {$forget_many_selection} in {$forget_many_seconds:.1f} s; "
      f"baseline (download, gunzip, gzip -6 every object) {$forget_baseline_seconds:.1f} s = "
      f"{compressed_mb / $forget_baseline_seconds:.1f} MB/s; forget / baseline: 1 user "
      f"{$forget_baseline_seconds / $forget_one_seconds:.1f} x as fast, 1,000 users "
      f"{$forget_baseline_seconds / $forget_many_seconds:.1f} x")
PY
