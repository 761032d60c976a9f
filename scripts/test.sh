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
# Superset gets a virtualenv of its own (Debian's Python needs python3-venv).
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
# promtool checks the alert rules; systemd-analyze checks the units; the
# bench's plots need a TrueType font.
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
# The TLS front's test runs Debian's nginx.
command -v nginx >/dev/null 2>&1 || apt_missing+=(nginx-light)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_missing+=(fonts-dejavu-core)
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
# The independent check of the explanations (TreeExplainer on the bundle's trees).
if ! python3 -c 'import shap' 2>/dev/null; then
  log "installing shap from PyPI"
  python3 -m pip install -q shap
fi

# --- Superset in its own virtualenv (scripts/superset.sh): the dashboards
# test imports configs/superset into a fresh one over a test warehouse.
scripts/superset.sh install

# --- the services: PostgreSQL, the broker (nisshi on PostgreSQL), SeaweedFS
# (S3) and MLflow, from scripts/stack.sh, which installs what is missing. A
# private stack on free ports, so a stack of the user's own is left alone.
export CARTSCORE_STACK_DIR
CARTSCORE_STACK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cartscore-stack.XXXXXX")
cleanup() {
  scripts/stack.sh down --purge || true
  rm -rf "$CARTSCORE_STACK_DIR"
}
trap cleanup EXIT
log "starting the stack (scripts/stack.sh up --free-ports --fresh)"
scripts/stack.sh up --free-ports --fresh >/dev/null
eval "$(scripts/stack.sh env --tests)"

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
set +e
cargo test --release --workspace --no-fail-fast 2>&1 | tee "${TMPDIR:-/tmp}/cartscore-test.log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo 'test result: .*' "${TMPDIR:-/tmp}/cartscore-test.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
read -r p f <<<"$passed"
echo "$p passed, $f failed"

# Every parser under the fuzzer for a short while (the instrumented build
# is cached in ~/.cache/cartscore/fuzz; README: a longer run).
log "fuzzing every target for ${CARTSCORE_FUZZ_SECONDS:=20}s (scripts/fuzz.sh)"
fuzz_status=0
bash scripts/fuzz.sh "$CARTSCORE_FUZZ_SECONDS" || fuzz_status=$?
[ "$status" -ne 0 ] || status=$fuzz_status
exit "$status"
