#!/usr/bin/env bash
# README command 1: the whole job end to end on this machine. Installs what is missing (cached),
# starts a Kafka-protocol broker (tansu) and an S3 server (moto) on free ports, produces sample
# Segment events, runs the archiver until everything is committed, and shows the bucket.
#
#   scripts/demo.sh [EVENTS] [SOURCES] [DAYS]      (default 50000 5 2)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/rig.sh

EVENTS="${1:-50000}"
SOURCES="${2:-5}"
DAYS="${3:-2}"
TOPIC=segment-events
BUCKET=segment-archive

start_installs ensure_tansu
ensure_python_tools
log "building kafka-s3-archiver"
cargo build --quiet
finish_installs
BIN="${CARGO_TARGET_DIR:-target}/debug/kafka-s3-archiver"

RIG_DIR="$(mktemp -d -t kafka-s3-archiver-demo.XXXXXX)"
ARCHIVER_PID=""
cleanup() {
  [[ -n "$ARCHIVER_PID" ]] && kill "$ARCHIVER_PID" 2>/dev/null || true
  stop_rig
  wait 2>/dev/null || true
}
trap cleanup EXIT

start_rig
log "tansu at $KAFKA_BROKERS, moto S3 at $S3_ENDPOINT (scratch: $RIG_DIR)"
"$TANSU_BIN" topic create "$TOPIC" --partitions 4 --broker "tcp://$KAFKA_BROKERS" >/dev/null
s3 s3 mb "s3://$BUCKET" >/dev/null

export ARCHIVER_KAFKA_BROKERS="$KAFKA_BROKERS" ARCHIVER_KAFKA_TOPIC="$TOPIC"
export ARCHIVER_S3_BUCKET="$BUCKET" ARCHIVER_S3_ENDPOINT_URL="$S3_ENDPOINT" ARCHIVER_S3_FORCE_PATH_STYLE=true
export ARCHIVER_BUFFER_DATA_DIR="$RIG_DIR/buffers"
# Upload every 5 seconds instead of hourly at :40, so the demo ends quickly.
export ARCHIVER_SCHEDULE_INTERVAL_SECS=5 ARCHIVER_SCHEDULE_OFFSET_SECS=0
# tansu drops offset-commit metadata, where exactly-once batch intents live; on it the archiver
# runs at-least-once (a single member restarting on its own volume stays exact regardless).
export ARCHIVER_KAFKA_EXACTLY_ONCE=best-effort
# Metrics, /healthz and /readyz on a free port.
export ARCHIVER_METRICS_LISTEN="127.0.0.1:$(free_port)"
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_EC2_METADATA_DISABLED=true

log "producing $EVENTS Segment events for $SOURCES sources over $DAYS days"
"$BIN" produce --count "$EVENTS" --sources "$SOURCES" --days "$DAYS" 2>&1 | grep -v '^  sent'

log "running the archiver (log: $RIG_DIR/archiver.log)"
"$BIN" run >"$RIG_DIR/archiver.log" 2>&1 &
ARCHIVER_PID=$!
deadline=$((SECONDS + 300))
until "$BIN" lag --wait --timeout 10 >"$RIG_DIR/lag.txt" 2>/dev/null; do
  if ! kill -0 "$ARCHIVER_PID" 2>/dev/null || ((SECONDS > deadline)); then
    echo "the archiver stopped or did not catch up; the end of its log:" >&2
    tail -n 30 "$RIG_DIR/archiver.log" >&2
    exit 1
  fi
  echo "waiting for the archiver to upload and commit everything..."
done
cat "$RIG_DIR/lag.txt"
log "everything committed; stopping the archiver (SIGTERM)"
kill -TERM "$ARCHIVER_PID"
wait "$ARCHIVER_PID"
ARCHIVER_PID=""

log "the bucket: aws s3 ls --recursive s3://$BUCKET"
# The listing goes to a file first: piping awscli into a reader that stops early (`awk ... exit`,
# `head`) makes it die of a broken pipe, which `set -o pipefail` turns into a failed demo.
s3 s3 ls --recursive "s3://$BUCKET" >"$RIG_DIR/listing.txt"
cat "$RIG_DIR/listing.txt"
# Event objects: .gz keys outside the `_manifests` and `_dead-letter` folders.
awk '$4 ~ /\.gz$/ && $4 !~ /\/_/ {print $4}' "$RIG_DIR/listing.txt" >"$RIG_DIR/event-objects.txt"
count=$(wc -l <"$RIG_DIR/event-objects.txt")
if ((count == 0)); then
  echo "the bucket holds no event object; the end of the archiver's log:" >&2
  tail -n 30 "$RIG_DIR/archiver.log" >&2
  exit 1
fi
first=$(sed -n 1p "$RIG_DIR/event-objects.txt")
log "$count event objects (and a manifest per batch under _manifests/); the first lines of s3://$BUCKET/$first, decompressed:"
s3 s3 cp --only-show-errors "s3://$BUCKET/$first" "$RIG_DIR/first.gz"
gzip -dc "$RIG_DIR/first.gz" >"$RIG_DIR/first.ndjson"
sed -n 1,3p "$RIG_DIR/first.ndjson"
s3 s3 sync --only-show-errors "s3://$BUCKET" "$RIG_DIR/bucket"
lines=$(find "$RIG_DIR/bucket/segment-logs" -path '*/_*' -prune -o -name '*.gz' -print0 \
  | xargs -0 gzip -dc | wc -l)
log "$lines events archived of $EVENTS produced"
if ((lines != EVENTS)); then
  echo "demo failed: the bucket holds $lines events, $EVENTS were produced (archiver log: $RIG_DIR/archiver.log)" >&2
  exit 1
fi
