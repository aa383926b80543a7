#!/usr/bin/env bash
# README command 2: installs and locates the servers and tools the tests need (tansu, moto,
# s3s-fs, awscli, prometheus, promtool, docker-compose, zstd, kubernetes-validate, duckdb, zstandard,
# aws-msk-iam-sasl-signer-python), then runs the whole suite: unit tests beside the code,
# end-to-end tests under tests/ that start their own servers on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/rig.sh

# Every install in the background at once, beside the build of the archiver's tests: on a fresh
# machine the servers' builds and the tests' each leave a core idle at times.
start_installs ensure_tansu ensure_s3s_fs ensure_python_tools ensure_ops_tools
log "building the tests and the test tools (examples/mock_kafka.rs)"
cargo build --examples
cargo test --all-targets --no-run "$@"
finish_installs
log "running the test suite"
cargo test --all-targets "$@"
if (($# == 0)); then
  # README command 1, which checks its own result: every event produced is in the bucket once.
  log "running the demo (scripts/demo.sh), then its tansu path on fewer events"
  scripts/demo.sh
  scripts/demo.sh --broker tansu 5000 2 1
fi
