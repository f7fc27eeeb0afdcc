#!/usr/bin/env bash
# The MLflow tracking server a cluster run reports to: runs and metrics in a database, artifacts (checkpoints,
# sample grids, the resolved config) under an artifact root that the server proxies, so training machines need
# only HTTP access to it and no storage credentials.
#
#   launch/mlflow-server.sh                 # one-box default: sqlite + local folder under $MLFLOW_HOME, on 127.0.0.1
#   AUTH=basic ADMIN_PASSWORD_FILE=/run/secrets/mlflow-admin HOST=0.0.0.0 \
#   BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   ARTIFACTS_DESTINATION=s3://my-bucket/mlflow ALLOWED_HOSTS='mlflow-host,mlflow-host:5000' launch/mlflow-server.sh
#
# Then on the cluster: MLFLOW_TRACKING_URI=http://mlflow-host:5000 (or tracking.uri=...), and with AUTH=basic a user
# in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials (docs/security.md).
# A database and an object store (docs/tracking.md, "PostgreSQL and S3"): `pip install 'glow-dist[server]'` in
# the server's environment brings the PostgreSQL driver (psycopg 3; postgresql:// URIs are given to SQLAlchemy as
# postgresql+psycopg://, whatever its default driver) and boto3. The S3 endpoint and keys go in the server's
# environment only (AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a
# profile): the server proxies artifacts, so training machines need neither. Before MLflow starts, each database and
# object store is reached once (launch/mlflow_server_check.py, with the Python next to $MLFLOW or $PYTHON): a wrong
# password, a missing database or bucket, refused keys or an unreachable host end the start with one line, exit 2.
#
# AUTH=basic runs MLflow's basic-auth app (`pip install 'glow-dist[server]'`, i.e. mlflow[auth]): every request but
# /health needs a user; users and per-experiment and per-model permissions live in AUTH_DATABASE_URI (default
# $MLFLOW_HOME/basic_auth.db). The admin account is made at the first start from ADMIN_USERNAME (default admin) and
# the password in MLFLOW_AUTH_ADMIN_PASSWORD or the file ADMIN_PASSWORD_FILE (e.g. a Kubernetes Secret mounted as a
# file); later starts ignore both (change the password through MLflow's API). Users without a grant get
# AUTH_DEFAULT_PERMISSION on every experiment and model (READ; NO_PERMISSIONS to see only what is granted).
# A password check costs the server a deliberately slow hash (about 2 s per request on a loaded 2-core VM), so a
# successful check is cached per worker for AUTH_CACHE_TTL seconds (60; 0 checks every request): a changed password
# or deleted user is then honoured within a minute on every worker.
# Secrets never reach a command line (`ps` shows those to every user of the machine): the admin password, the
# Flask secret key and the store URIs, which may hold database passwords, go to mlflow through its environment.
#
# HOST is 127.0.0.1 unless set. Any other address without AUTH=basic is refused unless ALLOW_ANONYMOUS=1 (a network
# only trusted machines reach): anyone who reaches an open server can register a model that the next `glow-dist
# sample --model models:/...` loads, or delete runs. Basic auth sends the password with every request, so across a
# network put TLS in front (nginx; docs/security.md).
set -euo pipefail

MLFLOW_HOME=${MLFLOW_HOME:-$PWD/mlflow-server}
BACKEND_STORE_URI=${BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}
HOST=${HOST:-127.0.0.1}                 # the training machines connect from outside: HOST=0.0.0.0 with AUTH=basic
PORT=${PORT:-5000}
WORKERS=${WORKERS:-4}                   # 40 ranks log through rank 0 only, so a few workers suffice
# MLflow 3 rejects Host headers other than localhost and private IPs; name the server as clients will address it.
ALLOWED_HOSTS=${ALLOWED_HOSTS:-}
AUTH=${AUTH:-}                          # basic: MLflow's basic-auth app
ALLOW_ANONYMOUS=${ALLOW_ANONYMOUS:-0}
MLFLOW=${MLFLOW:-mlflow}

die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

case $AUTH in
    basic | "") ;;
    *) die "AUTH=$AUTH: expected basic (MLflow's basic-auth app) or nothing" ;;
esac
case $HOST in
    127.* | localhost | ::1) ;;
    *) [[ -n $AUTH || $ALLOW_ANONYMOUS == 1 ]] || die "refusing to listen on $HOST without authentication: anyone \
who reaches it could register models that glow-dist loads or delete runs. Set AUTH=basic (and ADMIN_PASSWORD_FILE), \
or ALLOW_ANONYMOUS=1 on a network that only trusted machines reach" ;;
esac

# postgresql:// names no driver, and SQLAlchemy's default for it changed (psycopg2 up to 2.0, psycopg 3 from 2.1):
# name the one the `server` extra installs.
with_driver() { [[ $1 == postgresql://* ]] && echo "postgresql+psycopg://${1#postgresql://}" || echo "$1"; }
BACKEND_STORE_URI=$(with_driver "$BACKEND_STORE_URI")
AUTH_DATABASE_URI=$(with_driver "${AUTH_DATABASE_URI:-sqlite:///$MLFLOW_HOME/basic_auth.db}")
export MLFLOW_BACKEND_STORE_URI=$BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION=$ARTIFACTS_DESTINATION

[[ $BACKEND_STORE_URI == sqlite:* ]] && mkdir -p "$MLFLOW_HOME"
[[ $ARTIFACTS_DESTINATION != *://* ]] && mkdir -p "$ARTIFACTS_DESTINATION"   # a folder; s3://... is not one
remote() { [[ $1 == *://* && $1 != sqlite:* && $1 != file:* ]]; }
if remote "$BACKEND_STORE_URI" || remote "$ARTIFACTS_DESTINATION" || { [[ $AUTH == basic ]] && remote "$AUTH_DATABASE_URI"; }; then
    # The server's own Python (the mlflow console script's neighbour in its venv) has SQLAlchemy, the driver, boto3.
    PYTHON=${PYTHON:-$(dirname "$(command -v "$MLFLOW" || echo .)")/python}
    [[ -x $PYTHON ]] || PYTHON=python3
    check_auth=""; [[ $AUTH == basic ]] && check_auth=$AUTH_DATABASE_URI
    AUTH_DATABASE_URI=$check_auth "$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/mlflow_server_check.py" || exit 2
fi
args=(server --serve-artifacts --host "$HOST" --port "$PORT" --workers "$WORKERS")
[[ -n $ALLOWED_HOSTS ]] && args+=(--allowed-hosts "$ALLOWED_HOSTS")

if [[ $AUTH == basic ]]; then
    mkdir -p "$MLFLOW_HOME"
    if [[ -n ${ADMIN_PASSWORD_FILE:-} ]]; then
        [[ -r $ADMIN_PASSWORD_FILE ]] || die "ADMIN_PASSWORD_FILE=$ADMIN_PASSWORD_FILE is not a readable file"
        MLFLOW_AUTH_ADMIN_PASSWORD=$(<"$ADMIN_PASSWORD_FILE")
        export MLFLOW_AUTH_ADMIN_PASSWORD
    fi
    # The Flask secret key signs the UI's forms; one per server, kept across restarts (every worker must share it).
    key_file=$MLFLOW_HOME/flask-secret-key
    if [[ -z ${MLFLOW_FLASK_SERVER_SECRET_KEY:-} ]]; then
        [[ -s $key_file ]] || (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$key_file")
        MLFLOW_FLASK_SERVER_SECRET_KEY=$(<"$key_file")
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    # MLflow's auth config holds no secret here; umask 077 anyway (AUTH_DATABASE_URI may carry a password).
    (umask 077 && cat > "$MLFLOW_HOME/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $AUTH_DATABASE_URI
admin_username = ${ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${AUTH_CACHE_TTL:-60}
EOF
    )
    export MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_HOME/basic_auth.ini
    args+=(--app-name basic-auth)
fi
exec "$MLFLOW" "${args[@]}"
