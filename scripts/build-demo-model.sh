#!/usr/bin/env bash
# Rebuilds the bundled demo model deterministically from synthetic data.
#   scripts/build-demo-model.sh [OUT_DIR]      (default: models/demo)
# TRAINER may name a prebuilt cartscore-trainer binary; otherwise cargo builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-models/demo}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trainer=${TRAINER:-}
if [ -z "$trainer" ]; then
  cargo build --release -q -p cartscore-trainer
  trainer="${CARGO_TARGET_DIR:-target}/release/cartscore-trainer"
fi
"$trainer" synth --events 200000 --seed 7 --out "$work/events.csv" --oracle "$work/oracle.csv"
"$trainer" train --input "$work/events.csv" --oracle "$work/oracle.csv" --out "$out" \
  --trials 4 --threads 2 --seed 1 --max-iterations 100 --model-version demo-1
