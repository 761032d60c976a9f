# Superset over the cartscore warehouse (scripts/superset.sh): metadata in
# SQLite under SUPERSET_HOME, loopback only, nothing fetched from outside.
import os

_home = os.environ["SUPERSET_HOME"]

# Generated once by `scripts/superset.sh init` and kept beside the metadata:
# it encrypts the stored warehouse password.
with open(os.path.join(_home, "secret_key")) as _f:
    SECRET_KEY = _f.read().strip()

SQLALCHEMY_DATABASE_URI = "sqlite:///" + os.path.join(_home, "superset.db")
# SQLite metadata takes one writer at a time; the dashboards only read.
SQLALCHEMY_ENGINE_OPTIONS = {"connect_args": {"timeout": 30}}

# Charts ask the warehouse directly (no Celery, no Redis): a cache in
# memory per worker is enough for a handful of operators.
CACHE_CONFIG = {"CACHE_TYPE": "SimpleCache", "CACHE_DEFAULT_TIMEOUT": 300}
DATA_CACHE_CONFIG = CACHE_CONFIG

# The appliance's machine is offline-friendly: no telemetry, no map tiles.
SUPERSET_TELEMETRY = False
FEATURE_FLAGS = {"DASHBOARD_RBAC": False}

# `scripts/superset.sh screenshots` serves one throwaway copy to a headless
# browser without a login; never set this on a shared instance.
if os.environ.get("CARTSCORE_SUPERSET_ANONYMOUS_ADMIN") == "1":
    AUTH_ROLE_PUBLIC = "Admin"
    PUBLIC_ROLE_LIKE = "Admin"
