#!/usr/bin/env bash
# The operator's view in pictures: a scripted run of the whole loop, then
# headless Chromium screenshots of the Superset dashboard and of Prometheus
# graphs of the appliance's live metrics, into docs/img (or OUT_DIR).
#
#   scripts/screenshots.sh [OUT_DIR]
#
# The run: synthetic events of 14 days (a shop of `cartscore-trainer synth`)
# are loaded into a warehouse of their own; two models are trained from it
# (a quick one that serves, a tuned challenger in shadow/); the appliance
# takes the older events as they happened, then the newer ones with every
# cart scored before it is ingested (cartscore-producer http), while
# Prometheus scrapes it with the shipped alert rules; the resolved outcomes
# are copied to the warehouse (cartscore-trainer outcomes) and Superset
# shows the warehouse with the dashboards of configs/superset/dashboards.
#
# Needs PostgreSQL (scripts/stack.sh up starts it, CARTSCORE_POSTGRES names
# it); installs Debian's chromium and prometheus and Superset's virtualenv
# (scripts/superset.sh install) when they are missing. Takes ~6 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(mkdir -p "${1:-docs/img}" && cd "${1:-docs/img}" && pwd)
work=$(mktemp -d /tmp/cartscore-screenshots.XXXXXX)
log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # url, name, log
  for _ in $(seq 900); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "$2 did not answer $1:" >&2; tail -n 40 "$3" >&2; exit 1
}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
start() { # name, command...
  local name=$1; shift
  ( exec setsid "$@" >"$work/$name.log" 2>&1 ) &
  pids+=($!)
}

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
scripts/superset.sh install

server=${CARTSCORE_POSTGRES:-postgres://cartscore:cartscore@127.0.0.1:5432/cartscore}
server=${server%/*}
database=cartscore_screenshots
warehouse=$server/$database
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" -c "CREATE DATABASE $database" \
  || { echo "no PostgreSQL at $server: run scripts/stack.sh up" >&2; exit 1; }

log "building the binaries"
RUST_BACKTRACE=0 cargo build --release -q --bin cartscore --bin cartscore-trainer --bin cartscore-producer
bin=$root/target/release
export RUST_BACKTRACE=0

log "14 days of a synthetic shop, the first 11 into the warehouse"
"$bin/cartscore-trainer" synth --events 600000 --seed 7 --days 14 --invalid-rate 0.01 --out "$work/events.csv"
lines=$(wc -l <"$work/events.csv")
cut=$((lines * 11 / 14))
head -n "$cut" "$work/events.csv" >"$work/history.csv"
{ head -n 1 "$work/events.csv"; tail -n +"$((cut + 1))" "$work/events.csv"; } >"$work/live.csv"
"$bin/cartscore-trainer" load --input "$work/history.csv" --postgres "$warehouse" >/dev/null

log "training the champion (quick) and the challenger (tuned) from the warehouse"
"$bin/cartscore-trainer" train --source "$warehouse" --out "$work/champion" --trials 1 \
  --max-iterations 30 --model-version champion-1 >/dev/null
"$bin/cartscore-trainer" train --source "$warehouse" --out "$work/challenger" --trials 6 \
  --max-iterations 400 --model-version challenger-1 >/dev/null
mkdir -p "$work/models/shadow"
cp "$work/champion/model.onnx" "$work/models/model-champion-1.onnx"
cp "$work/challenger/model.onnx" "$work/models/shadow/model-challenger-1.onnx"

http_port=$(free_port) tcp_port=$(free_port) prom_port=$(free_port) superset_port=$(free_port)
appliance=http://127.0.0.1:$http_port
log "starting the appliance on $appliance"
CARTSCORE_STORE__SYNC=false CARTSCORE_STORE__MAP_SIZE_MIB=1024 \
  start appliance "$bin/cartscore" --http-listen "127.0.0.1:$http_port" --tcp-listen "127.0.0.1:$tcp_port" \
  --store-path "$work/store" --model-dir "$work/models"
wait_http "$appliance/readyz" cartscore "$work/appliance.log"

log "starting Prometheus on 127.0.0.1:$prom_port with the shipped rules"
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $root/configs/prometheus/cartscore-alerts.yml
scrape_configs:
  - job_name: cartscore
    static_configs:
      - targets: ['127.0.0.1:$http_port']
YML
start prometheus prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port"
wait_http "http://127.0.0.1:$prom_port/-/ready" prometheus "$work/prometheus.log"

log "the appliance takes the history, then the last 3 days with every cart scored"
# The producer names every invalid row it meets on stderr: into its log.
"$bin/cartscore-producer" http --appliance "$appliance" --input "$work/history.csv" --batch 2000 \
  >/dev/null 2>"$work/producer-history.log"
"$bin/cartscore-producer" http --appliance "$appliance" --input "$work/live.csv" --score-carts \
  --rate 1000 >"$work/replay.json" 2>"$work/producer-live.log"
# Carts still pending resolve when their sessions expire in event time: one
# event two days later moves the watermark past all of them.
last=$(tail -n 1 "$work/live.csv" | cut -d, -f1)
later=$(date -u -d "${last% UTC} + 2 days" '+%Y-%m-%d %H:%M:%S UTC')
curl -fsS -o /dev/null -H 'content-type: application/json' "$appliance/v1/events" \
  -d "{\"event_time\":\"$later\",\"event_type\":\"view\",\"product_id\":1,\"category_id\":1,\"price\":1.0,\"user_id\":1,\"user_session\":\"screenshots-watermark\"}"
sleep 20

log "copying the resolved outcomes to the warehouse"
"$bin/cartscore-trainer" outcomes --appliance "$appliance" --postgres "$warehouse" >"$work/outcomes.json"

log "Superset on 127.0.0.1:$superset_port"
CARTSCORE_SUPERSET_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(12))') \
  scripts/superset.sh init "$work/superset" "$warehouse"
CARTSCORE_SUPERSET_ANONYMOUS_ADMIN=1 start superset scripts/superset.sh serve "$work/superset" "$superset_port"
wait_http "http://127.0.0.1:$superset_port/health" superset "$work/superset.log"

shot() { # file, url, width, height
  log "screenshot $1"
  timeout 180 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --hide-scrollbars --window-size="$3,$4" --virtual-time-budget=30000 \
    --screenshot="$out/$1" "$2" >"$work/chromium.log" 2>&1 \
    || { tail -n 20 "$work/chromium.log" >&2; exit 1; }
}
prom_graph() { # expressions...: the graph page with one panel each, over the run
  local url="http://127.0.0.1:$prom_port/graph?" i=0 expr
  for expr in "$@"; do
    url+="g$i.expr=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$expr")"
    url+="&g$i.tab=0&g$i.range_input=4m&g$i.show_exemplars=0&"
    i=$((i + 1))
  done
  echo "$url"
}
shot superset-dashboard.png "http://127.0.0.1:$superset_port/superset/dashboard/cartscore/?standalone=1" 1600 2300
# Champion and challenger judged on the same resolved carts, the champion's
# calibration, and how often the two disagree about a cart.
shot prometheus-live-quality.png "$(prom_graph 'cartscore_comparison_roc_auc' \
  'cartscore_live_calibration_error' 'cartscore_agreement_flip_share')" 1400 2150
# Latency by route, and drift: the features furthest from the training
# profile (the weekday is left out: 3 days scored against a profile of 11
# differ by calendar) and the score itself.
shot prometheus-latency-drift.png "$(prom_graph \
  'histogram_quantile(0.99, sum by (le, route) (rate(cartscore_http_request_duration_seconds_bucket{route=~"/v1/(score|events)"}[30s])))' \
  'topk(6, cartscore_feature_psi{feature!="weekday"})' 'cartscore_score_psi')" 1400 2500
log "wrote $out/superset-dashboard.png, prometheus-live-quality.png, prometheus-latency-drift.png"
cat "$work/replay.json" "$work/outcomes.json" >&2
