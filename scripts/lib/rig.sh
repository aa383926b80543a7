# Shared by scripts/demo.sh, scripts/test.sh and .ci/run: installs the real servers the project
# runs against (cached between runs) and starts them on free local ports.
#
# tansu (Kafka-protocol broker) is built from crates.io once (~11 min cold on 2 cores) into
# $KSA_TOOLS_DIR; moto (S3 API server) and awscli come from PyPI into a venv there, unless the
# machine already has working ones.

KSA_TOOLS_DIR="${KSA_TOOLS_DIR:-$HOME/.cache/kafka-s3-archiver/tools}"
TANSU_VERSION="0.6.0"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_tansu() {
  local root="$KSA_TOOLS_DIR/tansu-$TANSU_VERSION"
  if [[ ! -x "$root/bin/tansu" ]]; then
    log "installing tansu $TANSU_VERSION (Kafka-protocol broker; about 11 minutes the first time)"
    mkdir -p "$root"
    cargo install "tansu@$TANSU_VERSION" --locked --features dynostore,libsql --root "$root" >&2
  fi
  export TANSU_BIN="$root/bin/tansu"
}

ensure_python_tools() {
  if command -v moto_server >/dev/null 2>&1 && moto_server --help >/dev/null 2>&1 \
    && command -v aws >/dev/null 2>&1 && aws --version >/dev/null 2>&1; then
    MOTO_SERVER="$(command -v moto_server)"
    AWS_CLI="$(command -v aws)"
  else
    local venv="$KSA_TOOLS_DIR/pyenv"
    if [[ ! -x "$venv/bin/moto_server" || ! -x "$venv/bin/aws" ]]; then
      log "installing moto (S3 API server) and awscli into $venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet "moto[server]" awscli >&2
    fi
    MOTO_SERVER="$venv/bin/moto_server"
    AWS_CLI="$venv/bin/aws"
  fi
  export MOTO_SERVER AWS_CLI
}

ensure_tools() {
  ensure_tansu
  ensure_python_tools
}

# Prometheus and promtool (alert rules, the scrape test), docker-compose (validates
# docker-compose.yml offline) from Debian; kubernetes-validate from PyPI.
ensure_ops_tools() {
  local missing=()
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
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
  export PROMETHEUS_BIN="$(command -v prometheus)"
  export PROMTOOL_BIN="$(command -v promtool)"
  export DOCKER_COMPOSE_BIN="$(command -v docker-compose)"
  export OPS_PYTHON="$venv/bin/python"
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

# Starts tansu and moto in $RIG_DIR; sets KAFKA_BROKERS, S3_ENDPOINT and RIG_PIDS.
start_rig() {
  RIG_PIDS=()
  local s3_port
  s3_port=$(free_port)
  "$MOTO_SERVER" -H 127.0.0.1 -p "$s3_port" >"$RIG_DIR/moto.log" 2>&1 &
  RIG_PIDS+=($!)
  start_tansu
  wait_port "$s3_port" moto
  S3_ENDPOINT="http://127.0.0.1:$s3_port"
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
  local root="$KSA_TOOLS_DIR/garage-$GARAGE_VERSION"
  if [[ ! -x "$root/bin/garage" ]]; then
    log "installing garage $GARAGE_VERSION (disk-backed S3 server; about 10 minutes the first time)"
    mkdir -p "$root"
    cargo install "garage@$GARAGE_VERSION" --locked --root "$root" >&2
  fi
  export GARAGE_BIN="$root/bin/garage"
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
