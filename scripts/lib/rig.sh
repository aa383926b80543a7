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
  local kafka_port s3_port
  kafka_port=$(free_port)
  s3_port=$(free_port)
  (cd "$RIG_DIR" && exec "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine memory://tansu/ >"$RIG_DIR/tansu.log" 2>&1) &
  RIG_PIDS+=($!)
  "$MOTO_SERVER" -H 127.0.0.1 -p "$s3_port" >"$RIG_DIR/moto.log" 2>&1 &
  RIG_PIDS+=($!)
  wait_port "$kafka_port" tansu
  wait_port "$s3_port" moto
  KAFKA_BROKERS="127.0.0.1:$kafka_port"
  S3_ENDPOINT="http://127.0.0.1:$s3_port"
}

stop_rig() {
  for pid in "${RIG_PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
}

s3() { # awscli against the local S3 server
  AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_EC2_METADATA_DISABLED=true \
    "$AWS_CLI" --endpoint-url "$S3_ENDPOINT" --region us-east-1 "$@"
}
