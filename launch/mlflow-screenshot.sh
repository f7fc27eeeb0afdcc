#!/usr/bin/env bash
# The README's picture of an MLflow run page, taken from a real run so that it stays true:
# trains the tiny debug model on the digits against a fresh `mlflow server` on a free loopback port, evaluates it with the
# baselines, and screenshots the run's Overview and Model metrics pages and one sample card full screen with headless
# Chromium (Debian's `chromium` package: apt-get install -y chromium) driven by Playwright, side by side in one PNG.
#
#   launch/mlflow-screenshot.sh                          # -> docs/mlflow-run-page.png
#   OUT=/tmp/page.png CONFIG=configs/digits.yaml STEPS=1500 EVERY=500 launch/mlflow-screenshot.sh
#   KEEP=1 launch/mlflow-screenshot.sh                   # leave the server's folder (printed) for a look
#
# Everything runs under a temporary folder; the server and Chromium are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/mlflow-run-page.png}
CONFIG=${CONFIG:-configs/debug.yaml}
STEPS=${STEPS:-60}                       # the debug model: well under a minute
EVERY=${EVERY:-20}                       # test bits/dim, samples and checkpoints every EVERY steps
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
BUDGET_MS=${BUDGET_MS:-120000}           # how long each page may take to be ready
[[ -x $CHROMIUM ]] || { echo "no chromium: apt-get install -y chromium (or set CHROMIUM=...)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/glow-mlflow-shot.XXXXXX)
SERVER_PID=""
cleanup() {
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    if [[ -z ${KEEP:-} ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 127.0.0.2 (loopback too): on 127.0.0.1 or localhost the UI opens its LLM assistant panel over a third of the page.
HOST=${HOST:-127.0.0.2}
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('$HOST', 0)); print(s.getsockname()[1])")
URI=http://$HOST:$PORT
"$PY" -m mlflow server --host "$HOST" --port "$PORT" --workers 1 \
    --backend-store-uri "sqlite:///$WORK/mlflow.db" --artifacts-destination "$WORK/artifacts" --allowed-hosts "$HOST:$PORT" \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

DATA=${DATA:-$WORK/digits}
[[ -f $DATA/manifest.json ]] || "$PY" -m glow_dist prepare digits --out "$DATA" >/dev/null
for _ in $(seq 240); do curl -sf "$URI/health" >/dev/null && break; sleep 0.5; done
curl -sf "$URI/health" >/dev/null || { tail -20 "$WORK/server.log" >&2; exit 1; }

RUN_DIR=$WORK/run
"$PY" -m glow_dist train --config "$CONFIG" data.root="$DATA" train.run_dir="$RUN_DIR" train.steps="$STEPS" \
    train.log_every=$((EVERY / 10 > 0 ? EVERY / 10 : 1)) train.eval_every="$EVERY" train.sample_every="$EVERY" \
    train.checkpoint_every="$EVERY" train.progress=false tracking.uri="$URI" tracking.experiment=glow-dist-review \
    tracking.register_as=glow-review
"$PY" -m glow_dist evaluate --checkpoint "$RUN_DIR" --baseline

RUN_URL=$("$PY" - "$URI" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("glow-dist-review")
run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
print(f"{sys.argv[1]}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
EOF
)
echo "run page: $RUN_URL?workflowType=machine_learning"

# Playwright drives the system's Chromium (its own browser download is not needed): waits for the charts, moves every
# sample card's step slider to the last step, and opens one card full screen (launch/mlflow_screenshot.py).
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q playwright
"$PY" launch/mlflow_screenshot.py "$RUN_URL" "$WORK" --chromium "$CHROMIUM" --timeout "$((BUDGET_MS / 1000))"

mkdir -p "$(dirname "$OUT")"
# Side by side, halved, as an 8-bit palette PNG: small enough to commit, sharp enough to read.
"$PY" - "$WORK/overview.png" "$WORK/metrics.png" "$WORK/samples.png" "$OUT" <<'EOF'
import sys
from PIL import Image
shots = [Image.open(p).convert("RGB") for p in sys.argv[1:4]]
page = Image.new("RGB", (sum(s.width for s in shots) + 16 * (len(shots) - 1), max(s.height for s in shots)), "white")
x = 0
for shot in shots:
    page.paste(shot, (x, 0))
    x += shot.width + 16
page = page.resize((page.width * 11 // 20, page.height * 11 // 20), Image.LANCZOS)
page.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(sys.argv[4], optimize=True)
print(f"wrote {sys.argv[4]}: {page.width}x{page.height}")
EOF
