#!/usr/bin/env bash
# The MLflow tracking server a cluster run reports to: runs and metrics in a database, artifacts (checkpoints,
# sample grids, the resolved config) under an artifact root that the server proxies, so training machines need
# only HTTP access to it and no storage credentials.
#
#   BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   ARTIFACTS_DESTINATION=s3://my-bucket/mlflow ALLOWED_HOSTS='mlflow-host,mlflow-host:5000' launch/mlflow-server.sh
#   launch/mlflow-server.sh                 # one-box default: sqlite + local folder under $MLFLOW_HOME
#
# Then on the cluster: MLFLOW_TRACKING_URI=http://mlflow-host:5000 (or tracking.uri=...).
# PostgreSQL needs `pip install psycopg2-binary`, S3 `pip install boto3` in the server's environment.
set -euo pipefail

MLFLOW_HOME=${MLFLOW_HOME:-$PWD/mlflow-server}
BACKEND_STORE_URI=${BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}
HOST=${HOST:-0.0.0.0}                   # listen on every interface: the training machines connect from outside
PORT=${PORT:-5000}
WORKERS=${WORKERS:-4}                   # 40 ranks log through rank 0 only, so a few workers suffice
# MLflow 3 rejects Host headers other than localhost and private IPs; name the server as clients will address it.
ALLOWED_HOSTS=${ALLOWED_HOSTS:-}
MLFLOW=${MLFLOW:-mlflow}

if [[ $BACKEND_STORE_URI == sqlite:* || $ARTIFACTS_DESTINATION != *://* ]]; then
    mkdir -p "$MLFLOW_HOME" "$ARTIFACTS_DESTINATION"
fi
args=(server --backend-store-uri "$BACKEND_STORE_URI" --artifacts-destination "$ARTIFACTS_DESTINATION"
      --serve-artifacts --host "$HOST" --port "$PORT" --workers "$WORKERS")
[[ -n $ALLOWED_HOSTS ]] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
exec "$MLFLOW" "${args[@]}"
