#!/usr/bin/env bash
# Superset over the cartscore warehouse, with the dashboards of
# configs/superset/dashboards (exported YAML: database, datasets, charts,
# dashboard) imported as they are in git.
#
#   scripts/superset.sh install
#       apache-superset (pinned) in its own virtualenv under
#       ~/.cache/cartscore/superset; nothing else on the machine changes
#   scripts/superset.sh init HOME [WAREHOUSE_URL]
#       fresh metadata (SQLite) in HOME, an `admin` user (password from
#       CARTSCORE_SUPERSET_PASSWORD, else generated into HOME/admin-password)
#       and the dashboards imported, pointed at WAREHOUSE_URL (default
#       $CARTSCORE_POSTGRES, else the stack's postgres://…/cartscore)
#   scripts/superset.sh import HOME [WAREHOUSE_URL]
#       imports the dashboards again (after a change in git)
#   scripts/superset.sh serve HOME PORT
#       serves HOME on 127.0.0.1:PORT (gunicorn, foreground)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

SUPERSET_VERSION=6.1.0
venv=$HOME/.cache/cartscore/superset
# Superset 6.1.0's wheel leaves these out or takes versions it breaks on
# (Flask-Caching 2.4 passes an argument its metastore cache refuses).
EXTRA_REQUIREMENTS=(psycopg2-binary "flask-caching==2.3.1" rich cachetools gunicorn)

die() { printf 'superset: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

install() {
  if "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('apache-superset') == '$SUPERSET_VERSION'; import psycopg2, rich, cachetools" 2>/dev/null; then
    return 0
  fi
  log "installing apache-superset $SUPERSET_VERSION into $venv (a few minutes, once)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "apache-superset==$SUPERSET_VERSION" "${EXTRA_REQUIREMENTS[@]}"
}

# The warehouse as SQLAlchemy names it (postgres:// -> postgresql+psycopg2://).
sqlalchemy_url() {
  local url=${1:-${CARTSCORE_POSTGRES:-postgres://cartscore:cartscore@127.0.0.1:5432/cartscore}}
  case $url in
    postgres://*) echo "postgresql+psycopg2://${url#postgres://}" ;;
    postgresql://*) echo "postgresql+psycopg2://${url#postgresql://}" ;;
    postgresql+psycopg2://*) echo "$url" ;;
    *) die "not a PostgreSQL URL: $url" ;;
  esac
}

superset() { # home, args...
  local home=$1; shift
  SUPERSET_HOME=$home SUPERSET_CONFIG_PATH=$root/configs/superset/superset_config.py \
    FLASK_APP=superset "$venv/bin/superset" "$@"
}

import_dashboards() { # home, url
  local home=$1 url zip
  url=$(sqlalchemy_url "${2:-}")
  zip=$home/cartscore-dashboards.zip
  # The bundle as Superset exports it, with this warehouse's address in
  # the database file.
  "$venv/bin/python" - "$root/configs/superset/dashboards" "$zip" "$url" <<'PY'
import pathlib, sys, zipfile
import yaml
src, out, url = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with zipfile.ZipFile(out, "w") as z:
    for path in sorted(src.rglob("*.yaml")):
        name = "cartscore_dashboards/" + str(path.relative_to(src))
        text = path.read_text()
        if path.parent.name == "databases":
            data = yaml.safe_load(text)
            data["sqlalchemy_uri"] = url
            text = yaml.safe_dump(data, sort_keys=False)
        z.writestr(name, text)
PY
  superset "$home" import-dashboards -p "$zip" -u admin >"$home/import.log" 2>&1 \
    || { tail -n 40 "$home/import.log" >&2; die "importing the dashboards failed (log: $home/import.log)"; }
  log "imported the dashboards of configs/superset/dashboards into $home"
}

init() { # home, url
  local home=${1:?HOME folder}
  install
  mkdir -p "$home"
  home=$(cd "$home" && pwd)
  [ -f "$home/superset.db" ] && die "$home already holds Superset metadata (use import, or a new folder)"
  umask 077
  [ -f "$home/secret_key" ] || "$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(48))' >"$home/secret_key"
  local password=${CARTSCORE_SUPERSET_PASSWORD:-}
  if [ -z "$password" ]; then
    password=$("$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(12))')
    echo "$password" >"$home/admin-password"
    log "the admin password is in $home/admin-password"
  fi
  log "creating Superset's metadata in $home"
  superset "$home" db upgrade >"$home/init.log" 2>&1 || { tail -n 40 "$home/init.log" >&2; die "db upgrade failed"; }
  superset "$home" fab create-admin --username admin --firstname cartscore --lastname operator \
    --email admin@localhost --password "$password" >>"$home/init.log" 2>&1 \
    || { tail -n 40 "$home/init.log" >&2; die "creating the admin user failed"; }
  superset "$home" init >>"$home/init.log" 2>&1 || { tail -n 40 "$home/init.log" >&2; die "superset init failed"; }
  import_dashboards "$home" "${2:-}"
}

serve() { # home, port
  local home=${1:?HOME folder} port=${2:?PORT}
  [ -f "$home/superset.db" ] || die "$home holds no Superset metadata: run scripts/superset.sh init $home first"
  home=$(cd "$home" && pwd)
  # Two workers of four threads: charts query the warehouse in parallel.
  SUPERSET_HOME=$home SUPERSET_CONFIG_PATH=$root/configs/superset/superset_config.py \
    exec "$venv/bin/gunicorn" --workers 2 --threads 4 --timeout 120 \
    --bind "127.0.0.1:$port" --control-socket "$home/gunicorn.ctl" "superset.app:create_app()"
}

case ${1:-} in
  install) install ;;
  init) shift; init "$@" ;;
  import) shift; install; import_dashboards "${1:?HOME folder}" "${2:-}" ;;
  serve) shift; serve "$@" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
