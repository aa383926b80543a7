#!/usr/bin/env bash
# README command 1: the whole job end to end on this machine, exactly-once on. Installs what is
# missing (cached), starts a Kafka-protocol broker and an S3 server (moto) on free ports,
# produces sample Segment events, runs the archiver until everything is committed, checks the
# bucket (every event once, `verify --deep` clean) and says what it showed.
#
#   scripts/demo.sh [--broker mock|tansu] [--keep] [EVENTS] [SOURCES] [DAYS]
#
# --broker mock (the default): librdkafka's mock cluster, built with the archiver; it keeps the
#   offset-commit metadata batch intents live in, so the archiver runs exactly_once = "required".
# --broker tansu: tansu, a broker that is a product of its own (about 10 minutes to build the
#   first time); it drops commit metadata, so the archiver runs "best-effort" (at least once).
# --keep: leaves the broker and the S3 server up after the summary, until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/rig.sh

BROKER=mock
KEEP=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --broker) BROKER="${2:-}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown option $1 (usage: scripts/demo.sh [--broker mock|tansu] [--keep] [EVENTS] [SOURCES] [DAYS])" >&2; exit 2 ;;
  esac
done
case "$BROKER" in
  mock | tansu) ;;
  *) echo "--broker is mock or tansu, not '$BROKER'" >&2; exit 2 ;;
esac
EVENTS="${1:-50000}"
SOURCES="${2:-5}"
DAYS="${3:-2}"
TOPIC=segment-events
BUCKET=segment-archive
# The mock cluster keeps about 5 MB per partition: 16 partitions hold 50,000 events (~45 MB).
PARTITIONS=16
[[ "$BROKER" == tansu ]] && PARTITIONS=4

RIG_DIR="$(mktemp -d -t kafka-s3-archiver-demo.XXXXXX)"
RIG_PIDS=()
ARCHIVER_PID=""
STEP="starting"
cleanup() {
  [[ -n "$ARCHIVER_PID" ]] && kill "$ARCHIVER_PID" 2>/dev/null || true
  stop_rig
  wait 2>/dev/null || true
}
trap cleanup EXIT

step() {
  STEP="$*"
  log "$*"
}
# Says which step failed and shows the end of the log that tells why.
fail() { # message [log]
  echo "demo failed while ${STEP}: $1" >&2
  if [[ -n "${2:-}" && -s "$2" ]]; then
    echo "the end of $2:" >&2
    tail -n 30 "$2" >&2
  fi
  exit 1
}

step "installing what is missing"
# In the background, beside the build: on a fresh machine each leaves a core idle at times.
if [[ "$BROKER" == tansu ]]; then
  start_installs ensure_python_tools ensure_tansu
else
  start_installs ensure_python_tools
fi
step "building kafka-s3-archiver and the mock cluster (a few minutes the first time; log: $RIG_DIR/build.log)"
cargo build --bin kafka-s3-archiver --example mock_kafka >"$RIG_DIR/build.log" 2>&1 \
  || fail "the build failed" "$RIG_DIR/build.log"
finish_installs
BIN="${CARGO_TARGET_DIR:-target}/debug/kafka-s3-archiver"

step "starting the broker ($BROKER) and the S3 server (moto)"
start_moto
if [[ "$BROKER" == tansu ]]; then
  start_tansu
  "$TANSU_BIN" topic create "$TOPIC" --partitions "$PARTITIONS" --broker "tcp://$KAFKA_BROKERS" >/dev/null
  # tansu drops offset-commit metadata, where exactly-once batch intents live; on it the
  # archiver runs at least once (a single member restarting on its own volume stays exact).
  export ARCHIVER_KAFKA_EXACTLY_ONCE=best-effort
  MODE='best-effort (at least once: tansu drops the commit metadata batch intents live in)'
else
  start_mock_kafka "$TOPIC" "$PARTITIONS" || fail "the mock cluster did not start" "$RIG_DIR/mock_kafka.log"
  export ARCHIVER_KAFKA_EXACTLY_ONCE=required
  MODE='required (exactly once: each batch intent is committed with its offsets, fenced by the group)'
fi
s3 s3 mb "s3://$BUCKET" >/dev/null
log "broker at $KAFKA_BROKERS, S3 at $S3_ENDPOINT (scratch: $RIG_DIR)"

export ARCHIVER_KAFKA_BROKERS="$KAFKA_BROKERS" ARCHIVER_KAFKA_TOPIC="$TOPIC"
export ARCHIVER_S3_BUCKET="$BUCKET" ARCHIVER_S3_ENDPOINT_URL="$S3_ENDPOINT" ARCHIVER_S3_FORCE_PATH_STYLE=true
export ARCHIVER_BUFFER_DATA_DIR="$RIG_DIR/buffers"
# Upload every 5 seconds instead of hourly at :40, so the demo ends quickly.
export ARCHIVER_SCHEDULE_INTERVAL_SECS=5 ARCHIVER_SCHEDULE_OFFSET_SECS=0
METRICS_PORT=$(free_port)
export ARCHIVER_METRICS_LISTEN="127.0.0.1:$METRICS_PORT"
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_EC2_METADATA_DISABLED=true

step "producing $EVENTS Segment events for $SOURCES sources over $DAYS days"
"$BIN" produce --count "$EVENTS" --sources "$SOURCES" --days "$DAYS" >"$RIG_DIR/produce.log" 2>&1 \
  || fail "the producer failed" "$RIG_DIR/produce.log"

step "archiving (log: $RIG_DIR/archiver.log; metrics: http://127.0.0.1:$METRICS_PORT/metrics while it runs)"
"$BIN" run >"$RIG_DIR/archiver.log" 2>&1 &
ARCHIVER_PID=$!
deadline=$((SECONDS + 300))
until "$BIN" lag --wait --timeout 10 >"$RIG_DIR/lag.txt" 2>/dev/null; do
  kill -0 "$ARCHIVER_PID" 2>/dev/null || fail "the archiver stopped" "$RIG_DIR/archiver.log"
  ((SECONDS <= deadline)) || fail "the archiver did not commit everything within 5 minutes" "$RIG_DIR/archiver.log"
  echo "waiting for the archiver to upload and commit everything..."
done
kill -TERM "$ARCHIVER_PID"
wait "$ARCHIVER_PID" || fail "the archiver did not stop cleanly on SIGTERM" "$RIG_DIR/archiver.log"
ARCHIVER_PID=""

step "checking the bucket"
# The listing goes to a file first: piping awscli into a reader that stops early makes it die
# of a broken pipe, which `set -o pipefail` turns into a failed demo.
s3 s3 ls --recursive "s3://$BUCKET" >"$RIG_DIR/listing.txt"
s3 s3 sync --only-show-errors "s3://$BUCKET" "$RIG_DIR/bucket"
# Event objects: .gz keys outside the `_manifests` and `_dead-letter` folders.
find "$RIG_DIR/bucket/segment-logs" -path '*/_*' -prune -o -name '*.gz' -print | sort >"$RIG_DIR/event-objects.txt"
objects=$(wc -l <"$RIG_DIR/event-objects.txt")
((objects > 0)) || fail "the bucket holds no event object" "$RIG_DIR/archiver.log"
batches=$(find "$RIG_DIR/bucket/segment-logs/_manifests/$TOPIC" -mindepth 2 -maxdepth 2 -name '*.json' | wc -l)
xargs -d '\n' gzip -dc <"$RIG_DIR/event-objects.txt" >"$RIG_DIR/events.ndjson"
lines=$(wc -l <"$RIG_DIR/events.ndjson")
once=$(sort -u "$RIG_DIR/events.ndjson" | wc -l)
((lines == EVENTS)) || fail "the bucket holds $lines events, $EVENTS were produced" "$RIG_DIR/archiver.log"
((once == lines)) || fail "$((lines - once)) events are in the bucket more than once" "$RIG_DIR/archiver.log"
"$BIN" verify --deep >"$RIG_DIR/verify.txt" 2>&1 || fail "verify --deep reported findings" "$RIG_DIR/verify.txt"
verdict=$(head -n 1 "$RIG_DIR/verify.txt")
first=$(head -n 1 "$RIG_DIR/event-objects.txt")

log "the bucket, s3://$BUCKET: $(wc -l <"$RIG_DIR/listing.txt") keys, the first few:"
head -n 5 "$RIG_DIR/listing.txt"
log "the first event of ${first#"$RIG_DIR/bucket/"}, decompressed (200 characters):"
head -n 1 "$RIG_DIR/events.ndjson" | cut -c 1-200

log "done in $((SECONDS / 60)) min $((SECONDS % 60)) s: what the demo showed"
cat <<SUMMARY
  events produced     $EVENTS ($SOURCES sources, $DAYS received-days, $PARTITIONS partitions, broker: $BROKER)
  events archived     $lines, each exactly once (checked line by line in the bucket)
  objects, batches    $objects event objects (gzip NDJSON) in $batches batches, each with its manifest
  exactly-once mode   $MODE
  verify --deep       no findings: $verdict
  bucket (a copy)     $RIG_DIR/bucket/segment-logs/{source-id}/{received-day}/
  archiver log        $RIG_DIR/archiver.log

Look further:
  find $RIG_DIR/bucket -name '*.gz' | head
  gzip -dc ${first} | head -n 3
  less $RIG_DIR/verify.txt
SUMMARY
if [[ -n "$KEEP" ]]; then
  log "--keep: the broker and S3 stay up until Ctrl-C"
  cat <<KEEP
  aws --endpoint-url $S3_ENDPOINT s3 ls --recursive s3://$BUCKET/   (AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local)
  ARCHIVER_KAFKA_BROKERS=$KAFKA_BROKERS ARCHIVER_S3_ENDPOINT_URL=$S3_ENDPOINT ... $BIN run   (the archiver again; metrics on ARCHIVER_METRICS_LISTEN)
KEEP
  wait
fi
