#!/usr/bin/env bash
# A minimal reproduction of the test broker's short-fetch-wait trap: a
# consumer behind by many small record batches reads one batch per
# partition per fetch when fetch.wait.max.ms is short, because nisshi gives
# a fetch's storage read about half that wait as its budget.
#   scripts/repro-fetch-wait.sh            (needs `scripts/stack.sh up`)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/stack.sh env)"
nisshi=${CARTSCORE_NISSHI:-$HOME/.cache/cartscore/bin/nisshi}
P=${CARGO_TARGET_DIR:-target}/release/cartscore-producer
[ -x "$P" ] || cargo build --release -q -p cartscore-producer
topic=repro.fetch-wait.$$
"$nisshi" topic create "$topic" --partitions 2 --broker "tcp://$CARTSCORE_KAFKA__BROKERS" >/dev/null
# 50,000 events, one record per batch (as a stream at a modest rate writes them).
RUST_BACKTRACE=0 "$P" replay --brokers "$CARTSCORE_KAFKA__BROKERS" --topic "$topic" \
  --input "${CARTSCORE_DATASET:-../shared/data/2019-Oct-head.csv}" --repeat 3 --limit 50000 -X batch.num.messages=1 2>/dev/null >/dev/null
for wait in 10 20 30 50 500; do
  RUST_BACKTRACE=0 "$P" drain --brokers "$CARTSCORE_KAFKA__BROKERS" --topic "$topic" --fetch-wait-ms "$wait" --seconds 20
done
"$nisshi" topic delete "$topic" --broker "tcp://$CARTSCORE_KAFKA__BROKERS" >/dev/null 2>&1 || true
