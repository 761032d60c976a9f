#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60)
# with libFuzzer and AddressSanitizer, starting from the committed seeds in
# fuzz/corpus/<target>. What a run discovers is kept in a scratch corpus
# (FUZZ_CORPUS, default ~/.cache/cartscore/fuzz/corpus), so the committed
# seeds stay small; a crash or a failed assertion stops the run with the
# input under fuzz/artifacts/<target>/ (`cargo fuzz run TARGET ARTIFACT`
# replays it; add it to the target's regression test, then fix).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(event frame http bundle config)

cache=$HOME/.cache/cartscore/fuzz
fuzz=$cache/bin/cargo-fuzz
FUZZ_VERSION=0.13.2
if ! "$fuzz" --version 2>/dev/null | grep -q "$FUZZ_VERSION"; then
  echo "==> building cargo-fuzz $FUZZ_VERSION (cached in $cache afterwards)"
  cargo install cargo-fuzz --version "$FUZZ_VERSION" --locked -q --root "$cache"
fi
# cargo-fuzz passes -Z flags (sanitizers, coverage instrumentation): the
# stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1 RUST_BACKTRACE=0
corpus=${FUZZ_CORPUS:-$cache/corpus}
# The instrumented build (every dependency, AddressSanitizer, one codegen
# unit) takes half an hour cold: kept outside the checkout, it is reused.
build_dir=${FUZZ_TARGET_DIR:-$cache/target}

echo "==> building the fuzz targets (AddressSanitizer, overflow checks)"
"$fuzz" build --fuzz-dir fuzz --target-dir "$build_dir"

for name in "${targets[@]}"; do
  mkdir -p "$corpus/$name"
  log=$(mktemp)
  echo "==> fuzzing $name for ${seconds}s"
  # -rss_limit_mb: tract and the in-process appliance need more than the 2 GB default allows under ASan.
  status=0
  "$fuzz" run --fuzz-dir fuzz --target-dir "$build_dir" "$name" "$corpus/$name" "fuzz/corpus/$name" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=6144 -print_final_stats=1 >"$log" 2>&1 || status=$?
  # The last status line (`#N DONE cov: … ft: … corp: …`) gives the run's
  # coverage: edges (cov) and features (ft) reached, the corpus it kept.
  grep -E "^(Done|INFO: seed corpus|stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)|^#[0-9]+[[:space:]]+DONE|panicked|^==[0-9]+==|^SUMMARY|Test unit written" "$log" || true
  if [ "$status" -ne 0 ]; then
    grep -E -A12 "panicked at" "$log" | head -40 >&2 || true
    echo "fuzz target $name failed (exit $status); the input is under fuzz/artifacts/$name/" >&2
    rm -f "$log"
    exit "$status"
  fi
  rm -f "$log"
done
echo "==> every fuzz target ran ${seconds}s without a failure"
