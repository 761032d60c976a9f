#!/usr/bin/env bash
# TCP and HTTP latency at 10k scores/s with the closed loop's recording on and
# off (store.record_scores), alternately: a fresh appliance per run with the
# real slice's state, scored with the data set's carts. Usage:
#   scripts/bench-recording.sh [RUNS]      (release binaries built first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
bin=${CARGO_TARGET_DIR:-target}/release
data=${CARTSCORE_DATASET:-../shared/data/2019-Oct-head.csv}
work=$(mktemp -d)
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
export RUST_BACKTRACE=0
http=127.0.0.1:18080 tcp=127.0.0.1:17070

# The slice's events through POST /v1/events, 1,000 at a time.
load() {
  python3 - "$1" "$data" <<'PY'
import csv, json, sys, urllib.request
url, path = sys.argv[1], sys.argv[2]
def post(batch):
    request = urllib.request.Request(url + "/v1/events", data=json.dumps(batch).encode(),
                                     headers={"content-type": "application/json"})
    urllib.request.urlopen(request).read()
batch = []
with open(path) as f:
    for r in csv.DictReader(f):
        if not r.get("user_session"):
            continue
        event = {k: r[k] for k in ["event_time", "event_type", "category_code", "brand", "user_session"]}
        event.update(product_id=int(r["product_id"]), category_id=int(r["category_id"]),
                     price=float(r["price"] or 0), user_id=int(r["user_id"]))
        batch.append(event)
        if len(batch) == 1000:
            post(batch); batch = []
if batch:
    post(batch)
PY
}

for run in $(seq "$runs"); do
  for recording in false true; do
    rm -rf "$work/$recording" && mkdir -p "$work/$recording/models"
    cp models/demo/model.onnx "$work/$recording/models/"
    CARTSCORE_STORE__PATH="$work/$recording/store" CARTSCORE_MODEL__DIR="$work/$recording/models" \
      CARTSCORE_STORE__RECORD_SCORES=$recording CARTSCORE_HTTP__LISTEN=$http CARTSCORE_TCP__LISTEN=$tcp \
      "$bin/cartscore" >"$work/$recording/log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -fs -o /dev/null "http://$http/readyz" && break; sleep 0.1; done
    load "http://$http"
    echo "run $run, recording $recording"
    "$bin/cartscore-bench" tcp --addr "$tcp" --rate 10000 --connections 1 --pipeline 16 \
      --duration 10 --warmup 2 --input "$data" | grep -E "errors|from schedule" | sed 's/^/  tcp  /'
    "$bin/cartscore-bench" http --url "http://$http/v1/score" --rate 10000 --connections 2 --pipeline 8 \
      --duration 10 --warmup 2 --input "$data" | grep -E "errors|from schedule" | sed 's/^/  http /'
    kill "$pid"; wait "$pid" || true
  done
done
