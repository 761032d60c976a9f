#!/usr/bin/env bash
# Tree scoring engine by engine (README, "Tree scoring, engine by engine"):
# cartscore's compiled evaluator beside ONNX Runtime, LightGBM, treelite +
# tl2cgen and lleaves, on the same models (the demo bundle, 100 trees x 31
# leaves, 500 trees x 31 leaves, the last two trained by cartscore-trainer
# on synthetic data) and the same rows (the served feature rows of the
# synthetic carts), at batch 1, 16 and 1,024, in one run. Writes a table
# and docs/img/engines.png.
#   bench/engines/compare.sh [OUT_DIR]       (default: target/engines)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/engines}
mkdir -p "$out"
export RUST_BACKTRACE=0
bin=${CARGO_TARGET_DIR:-target}/release

# The engines in a virtualenv of their own: lleaves 1.3 needs llvmlite <
# 0.44 (0.50 lacks PassManagerBuilder), while numba (and so shap, which the
# tests use) needs llvmlite >= 0.50.
venv=$out/venv
if ! "$venv/bin/python" -c 'import onnx, onnxruntime, lightgbm, treelite, tl2cgen, lleaves, matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnx onnxruntime lightgbm 'treelite==4.*' 'tl2cgen==1.*' 'lleaves==1.3.*' \
    'llvmlite==0.43.*' matplotlib numpy
fi
cargo build --release -q -p cartscore-trainer -p cartscore-bench

[ -f "$out/events.csv" ] || "$bin/cartscore-trainer" synth --events 1000000 --seed 11 --out "$out/events.csv"
for trees in 100 500; do
  if [ ! -f "$out/trees-$trees/model.onnx" ]; then
    printf 'trials = 1\nthreads = 1\nnum_leaves = 31\nearly_stopping = 0\nmax_iterations = %d\n' "$trees" >"$out/train-$trees.toml"
    "$bin/cartscore-trainer" train --input "$out/events.csv" --out "$out/trees-$trees" \
      --config "$out/train-$trees.toml" --model-version "trees-$trees" >/dev/null
  fi
done
[ -f "$out/rows.csv" ] || "$bin/cartscore-trainer" predict --input "$out/events.csv" \
  --model models/demo/model.onnx --out "$out/rows.csv" >/dev/null

models=(models/demo "$out/trees-100" "$out/trees-500")
bundles=()
for m in "${models[@]}"; do bundles+=(--bundle "$m/model.onnx"); done
"$bin/cartscore-bench" engine "${bundles[@]}" --rows "$out/rows.csv" --json "$out/cartscore.json"
"$venv/bin/python" bench/engines/compare.py --models "${models[@]}" --rows "$out/rows.csv" \
  --cartscore "$out/cartscore.json" --table "$out/engines.md" --plot docs/img/engines.png
