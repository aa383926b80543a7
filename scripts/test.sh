#!/usr/bin/env bash
# README command 2: installs and locates the servers and tools the tests need (tansu, moto,
# s3s-fs, awscli, prometheus, promtool, docker-compose, zstd, kubernetes-validate, duckdb, zstandard,
# aws-msk-iam-sasl-signer-python), then runs the whole suite: unit tests beside the code,
# end-to-end tests under tests/ that start their own servers on free ports.
#
#   scripts/test.sh               the whole suite, then the demo (both brokers)
#   scripts/test.sh ARGS...       cargo test ARGS... (e.g. --test end_to_end, or -- a_test_name)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/rig.sh

# Every install in the background at once, beside the build of the archiver's tests: on a fresh
# machine the servers' builds and the tests' each leave a core idle at times. tansu's build is
# the longest of all (about 10 minutes alone on two cores), so it has a wait of its own: the
# tests that need no tansu run while it finishes.
start_installs ensure_s3s_fs ensure_python_tools ensure_ops_tools
ensure_tansu >/dev/null &
TANSU_INSTALL=$!
log "building the tests and the test tools (examples/mock_kafka.rs)"
cargo build --examples
cargo test --all-targets --no-run "$@"
finish_installs

wait_for_tansu() {
  wait "$TANSU_INSTALL" || { echo "installing tansu failed (see its output above)" >&2; exit 1; }
  ensure_tansu # installed now: only sets TANSU_BIN
}

renice_tree() { # niceness pid: the process and every process under it
  local child
  renice -n "$1" -p "$2" >/dev/null 2>&1 || true
  for child in $(ps -o pid= --ppid "$2" 2>/dev/null); do
    renice_tree "$1" "$child"
  done
}

if (($#)); then
  wait_for_tansu
  # Not --all-targets: with it, `--test NAME` would still run every target.
  cargo test "$@"
  exit
fi

# The test files that start tansu: through the harness's Rig::start (tansu and moto) or
# Broker::start_tansu. Every other test target runs first.
tansu_tests=() other_tests=()
for file in tests/*.rs; do
  name=$(basename "$file" .rs)
  if grep -qE 'Rig::start\(|start_tansu' "$file"; then
    tansu_tests+=(--test "$name")
  else
    other_tests+=(--test "$name")
  fi
done

# The tests measure time (deadlines, timeouts): tansu's build, if still going, yields to them.
renice_tree 10 "$TANSU_INSTALL"
log "running the tests that need no tansu (unit tests, the simulation, the mock cluster's)"
cargo test --lib --bins --examples --benches "${other_tests[@]}"
# README command 1, which checks its own result: every event produced is in the bucket once.
log "running the demo (scripts/demo.sh, on the mock cluster)"
scripts/demo.sh
if ! [[ -x "${KSA_TOOLS_DIR}/tansu-${TANSU_VERSION}/bin/tansu" ]]; then
  log "waiting for tansu's build to finish (log: $KSA_TOOLS_DIR/tansu-$TANSU_VERSION/install.log)"
fi
wait_for_tansu
log "running the tests on tansu"
cargo test "${tansu_tests[@]}"
log "running the demo's tansu path on fewer events"
scripts/demo.sh --broker tansu 5000 2 1
