# Shared by scripts/demo.sh, scripts/test.sh and .ci/run: installs the real servers the project
# runs against (cached between runs) and starts them on free local ports.
#
# tansu (Kafka-protocol broker) is built from crates.io once (~10.5 min cold on 2 cores) into
# $KSA_TOOLS_DIR; moto (S3 API server, pinned) comes from PyPI into a venv there, and awscli too
# unless the machine already has a working one.

KSA_TOOLS_DIR="${KSA_TOOLS_DIR:-$HOME/.cache/kafka-s3-archiver/tools}"
TANSU_VERSION="0.6.0"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs CRATE@VERSION from crates.io once into $KSA_TOOLS_DIR/CRATE-VERSION and exports VAR
# as its binary (named like the crate). WHAT says what it is and how long the first build takes;
# the remaining arguments go to cargo install.
cargo_tool() { # CRATE VERSION VAR WHAT [cargo install arguments...]
  local crate=$1 version=$2 var=$3 what=$4
  shift 4
  local root="$KSA_TOOLS_DIR/$crate-$version"
  if [[ ! -x "$root/bin/$crate" ]]; then
    # One line here; the compiler's output goes to a log, shown if the install fails.
    mkdir -p "$root"
    log "installing $crate $version ($what; log: $root/install.log)"
    if ! cargo install "$crate@$version" --locked --root "$root" "$@" >"$root/install.log" 2>&1; then
      echo "installing $crate $version failed; the end of $root/install.log:" >&2
      tail -n 30 "$root/install.log" >&2
      return 1
    fi
  fi
  export "$var=$root/bin/$crate"
}

# Only the storage engine the rig uses: memory:// is tansu's object-store engine (dynostore)
# over an in-memory store. libsql, postgres and the lake features would only add build time.
ensure_tansu() {
  cargo_tool tansu "$TANSU_VERSION" TANSU_BIN \
    "Kafka-protocol broker; about 10 minutes the first time" --features dynostore
}

# moto is pinned and always the rig's own: the S3 answers the tests check depend on its version
# (moto 5.2.1, found preinstalled on machines here, answers CompleteMultipartUpload with an XML
# root the AWS SDK refuses). awscli is whatever the machine has, else the venv's.
MOTO_VERSION=5.2.5

ensure_python_tools() {
  local venv="$KSA_TOOLS_DIR/pyenv"
  if [[ ! -x "$venv/bin/moto_server" ]] \
    || [[ "$("$venv/bin/pip" show moto 2>/dev/null | sed -n 's/^Version: //p')" != "$MOTO_VERSION" ]]; then
    log "installing moto $MOTO_VERSION (S3 API server) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "moto[server]==$MOTO_VERSION" >&2
  fi
  MOTO_SERVER="$venv/bin/moto_server"
  if command -v aws >/dev/null 2>&1 && aws --version >/dev/null 2>&1; then
    AWS_CLI="$(command -v aws)"
  else
    if [[ ! -x "$venv/bin/aws" ]]; then
      log "installing awscli into $venv"
      "$venv/bin/pip" install --quiet awscli >&2
    fi
    AWS_CLI="$venv/bin/aws"
  fi
  export MOTO_SERVER AWS_CLI
}

# s3s-fs: a second S3 implementation for the tests, one that verifies CRC32C trailers and
# supports If-None-Match (moto checks neither). Later versions need a newer rustc.
S3S_FS_VERSION="0.14.1"

ensure_s3s_fs() {
  cargo_tool s3s-fs "$S3S_FS_VERSION" S3S_FS_BIN \
    "S3 API server on a directory; about 2 minutes the first time" --features binary
}

# cargo-deny (licenses, banned crates, sources; .ci/run): about 2 minutes the first time.
CARGO_DENY_VERSION="0.20.2"
ensure_cargo_deny() {
  cargo_tool cargo-deny "$CARGO_DENY_VERSION" CARGO_DENY_BIN \
    "dependency licenses and bans; about 2 minutes the first time"
}

# On a fresh machine the broker's cold build and the archiver's overlap: each has long stretches
# that keep one core busy (build scripts, the final link). Starts the given installers (e.g.
# ensure_tansu) in the background; finish_installs waits for them and sets their variables.
start_installs() {
  INSTALLERS=("$@")
  INSTALL_PIDS=()
  local installer
  for installer in "$@"; do
    "$installer" >/dev/null &
    INSTALL_PIDS+=($!)
  done
}

finish_installs() {
  local pid installer
  for pid in "${INSTALL_PIDS[@]}"; do
    wait "$pid" || { echo "installing a server failed (see its output above)" >&2; exit 1; }
  done
  # Already installed now: each call only sets its variables.
  for installer in "${INSTALLERS[@]}"; do
    "$installer"
  done
}

# Prometheus and promtool (alert rules, the scrape test), docker-compose (validates
# docker-compose.yml offline) from Debian; kubernetes-validate from PyPI.
DUCKDB_VERSION=1.1.3
ZSTANDARD_VERSION=0.23.0
MSK_SIGNER_VERSION=1.0.1

ensure_ops_tools() {
  local missing=()
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  # tests/zstd_objects.rs reads zstd objects with the zstd CLI.
  command -v zstd >/dev/null 2>&1 || missing+=(zstd)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  local venv="$KSA_TOOLS_DIR/ops-venv"
  if [[ ! -x "$venv/bin/kubernetes-validate" ]]; then
    log "installing kubernetes-validate into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kubernetes-validate pyyaml >&2
  fi
  # A real query engine reads the bucket (tests/query_engine.rs) and zstd objects with Python's
  # zstandard (tests/zstd_objects.rs); AWS's reference MSK IAM signer checks the archiver's
  # tokens (tests/msk_iam.rs).
  if ! "$venv/bin/python" -c "import duckdb, zstandard, aws_msk_iam_sasl_signer" 2>/dev/null; then
    log "installing duckdb, zstandard and aws-msk-iam-sasl-signer-python into $venv"
    "$venv/bin/pip" install --quiet "duckdb==$DUCKDB_VERSION" "zstandard==$ZSTANDARD_VERSION" \
      "aws-msk-iam-sasl-signer-python==$MSK_SIGNER_VERSION" >&2
  fi
  export PROMETHEUS_BIN="$(command -v prometheus)"
  export PROMTOOL_BIN="$(command -v promtool)"
  export DOCKER_COMPOSE_BIN="$(command -v docker-compose)"
  export ZSTD_BIN="$(command -v zstd)"
  export OPS_PYTHON="$venv/bin/python"
}

# matplotlib for the chart of `scripts/bench.sh --scaling` (bench only).
MATPLOTLIB_VERSION=3.9.2

ensure_chart_tools() {
  local venv="$KSA_TOOLS_DIR/chart-venv"
  if ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
    log "installing matplotlib $MATPLOTLIB_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "matplotlib==$MATPLOTLIB_VERSION" >&2
  fi
  export CHART_PYTHON="$venv/bin/python"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port name
  local port=$1 name=$2
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$name did not start listening on port $port" >&2
  return 1
}

# Starts moto in $RIG_DIR on a free port; sets S3_ENDPOINT, appends to RIG_PIDS.
start_moto() {
  local s3_port
  s3_port=$(free_port)
  "$MOTO_SERVER" -H 127.0.0.1 -p "$s3_port" >"$RIG_DIR/moto.log" 2>&1 &
  RIG_PIDS+=($!)
  wait_port "$s3_port" moto
  S3_ENDPOINT="http://127.0.0.1:$s3_port"
}

# Starts librdkafka's mock cluster (examples/mock_kafka.rs, built beside the archiver: no second
# product to build) in $RIG_DIR: three brokers in one process that keep offset-commit metadata
# and fence commits as Kafka's group coordinator does, with TOPIC of PARTITIONS partitions, each
# keeping about its last 5 MB. It reads fault commands on stdin, held open on file descriptor 9
# until the script ends. Sets KAFKA_BROKERS, appends to RIG_PIDS.
start_mock_kafka() { # topic partitions
  local topic=$1 partitions=$2
  local bin="${CARGO_TARGET_DIR:-target}/debug/examples/mock_kafka"
  mkfifo "$RIG_DIR/mock_kafka.in"
  "$bin" --brokers 3 --topic "$topic" --partitions "$partitions" \
    <"$RIG_DIR/mock_kafka.in" >"$RIG_DIR/mock_kafka.out" 2>"$RIG_DIR/mock_kafka.log" &
  RIG_PIDS+=($!)
  exec 9>"$RIG_DIR/mock_kafka.in"
  for _ in $(seq 1 150); do
    KAFKA_BROKERS=$(sed -n 's/^bootstrap=//p' "$RIG_DIR/mock_kafka.out")
    [[ -n "$KAFKA_BROKERS" ]] && return 0
    sleep 0.2
  done
  echo "the mock cluster did not start (log: $RIG_DIR/mock_kafka.log)" >&2
  return 1
}

# Starts tansu and moto in $RIG_DIR; sets KAFKA_BROKERS, S3_ENDPOINT and RIG_PIDS.
start_rig() {
  RIG_PIDS=()
  start_moto
  start_tansu
}

stop_rig() {
  for pid in "${RIG_PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
}

s3() { # awscli against the local S3 server (moto takes any key; Garage the one start_garage made)
  AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local} \
    AWS_EC2_METADATA_DISABLED=true \
    "$AWS_CLI" --endpoint-url "$S3_ENDPOINT" --region us-east-1 "$@"
}

GARAGE_VERSION="2.5.0"

# Garage: a disk-backed S3 server, for benchmarks that move gigabytes (moto keeps everything in
# memory). AGPL-3.0, so it is only ever run as a separate server, never linked.
ensure_garage() {
  cargo_tool garage "$GARAGE_VERSION" GARAGE_BIN \
    "disk-backed S3 server; about 10 minutes the first time"
}

# Starts a single-node Garage with its data under $1 and creates bucket $2 with a key of ours;
# sets S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and appends to RIG_PIDS.
start_garage() {
  local dir=$1 bucket=$2 s3_port rpc_port admin_port config node
  s3_port=$(free_port)
  rpc_port=$(free_port)
  admin_port=$(free_port)
  mkdir -p "$dir/meta" "$dir/data"
  config="$dir/garage.toml"
  cat >"$config" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
TOML
  "$GARAGE_BIN" -c "$config" server >"$dir/garage.log" 2>&1 &
  RIG_PIDS+=($!)
  wait_port "$s3_port" garage
  for _ in $(seq 1 50); do
    node=$("$GARAGE_BIN" -c "$config" node id -q 2>/dev/null) && break
    sleep 0.2
  done
  node=${node%%@*}
  "$GARAGE_BIN" -c "$config" layout assign -z dc1 -c 10G "$node" >/dev/null
  "$GARAGE_BIN" -c "$config" layout apply --version 1 >/dev/null
  AWS_ACCESS_KEY_ID="GK$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
  AWS_SECRET_ACCESS_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
  "$GARAGE_BIN" -c "$config" key import "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" --yes >/dev/null
  "$GARAGE_BIN" -c "$config" bucket create "$bucket" >/dev/null
  "$GARAGE_BIN" -c "$config" bucket allow --read --write --owner "$bucket" --key "$AWS_ACCESS_KEY_ID" >/dev/null
  S3_ENDPOINT="http://127.0.0.1:$s3_port"
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
}

# Starts tansu alone (memory storage) on a free port; sets KAFKA_BROKERS, appends to RIG_PIDS.
start_tansu() {
  local kafka_port
  kafka_port=$(free_port)
  (cd "$RIG_DIR" && exec "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine memory://tansu/ >"$RIG_DIR/tansu.log" 2>&1) &
  RIG_PIDS+=($!)
  wait_port "$kafka_port" tansu
  KAFKA_BROKERS="127.0.0.1:$kafka_port"
}
