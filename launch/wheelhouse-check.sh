#!/usr/bin/env bash
# Prove that a wheelhouse (launch/wheelhouse.sh) installs and runs with no network, on this machine, GPU or not:
#
#   launch/wheelhouse-check.sh WHEELHOUSE [VENV]          (make wheelhouse-check WHEELHOUSE=dir)
#
# 1. a fresh venv (VENV, default a new temporary folder) and `make install WHEELHOUSE=...` into it, with pip's own
#    configuration and every index/find-links variable off, PIP_NO_INDEX=1, and every proxy variable aimed at a closed
#    port; where the kernel allows it (unshare -rn), all of it inside a new network namespace that has only a
#    loopback interface, so no package, DNS name or address outside this machine can be reached at all;
# 2. in that venv, still offline: the imports with their versions, `horovodrun --check-build` (which must list NCCL
#    for a CUDA flavour), `glow-dist doctor`, and `horovodrun -np 2 glow-dist doctor` (a Gloo all-reduce on 127.0.0.1
#    on a CPU machine, NCCL on GPUs).
# Multi-GB and minutes long for a CUDA flavour: not part of `make test`.
set -euo pipefail

HOUSE=$(cd "${1:?usage: wheelhouse-check.sh WHEELHOUSE [VENV]}" && pwd)
VENV=${2:-$(mktemp -d)/venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$HOUSE/requirements.txt" ] || { echo "wheelhouse-check: $HOUSE/requirements.txt missing" >&2; exit 1; }
[ ! -e "$VENV" ] || { echo "wheelhouse-check: $VENV exists; give a new folder" >&2; exit 1; }
torch_wheel=$(ls "$HOUSE"/torch-*.whl | head -1)
flavour=$(python3 "$HERE/launch/torch_flavour.py" "$torch_wheel")
echo "wheelhouse-check: $HOUSE ($flavour: $(basename "$torch_wheel"); $(ls "$HOUSE" | wc -l) files, $(du -sh "$HOUSE" | cut -f1))"

dead=http://127.0.0.1:9
offline=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null
         PIP_NO_INDEX=1 "http_proxy=$dead" "https_proxy=$dead" "HTTP_PROXY=$dead" "HTTPS_PROXY=$dead" "all_proxy=$dead"
         "ALL_PROXY=$dead" no_proxy= NO_PROXY= MLFLOW_TRACKING_URI=)
if unshare -rn true 2>/dev/null; then
    offline=(unshare -rn "${offline[@]}")
    how="a network namespace with only loopback (unshare -rn), pip configuration off, PIP_NO_INDEX=1, proxies dead"
else
    how="pip configuration off, PIP_NO_INDEX=1, every proxy variable at $dead (no unshare here)"
fi
echo "wheelhouse-check: offline = $how"

# Everything below runs in one offline shell: the namespace is made once, loopback brought up for Gloo.
"${offline[@]}" bash -euo pipefail -s "$HOUSE" "$VENV" "$HERE" "$flavour" <<'EOF'
HOUSE=$1 VENV=$2 HERE=$3 FLAVOUR=$4
ip link set lo up 2>/dev/null || true
python3 - <<'PY'
import socket
for host, port in (("pypi.org", 443), ("1.1.1.1", 443)):
    try:
        socket.create_connection((host, port), timeout=3).close()
        raise SystemExit(f"wheelhouse-check: {host}:{port} is reachable: this is not offline")
    except OSError as e:
        print(f"wheelhouse-check: {host}:{port} unreachable ({type(e).__name__}: {e})")
PY
start=$(date +%s)
echo "wheelhouse-check: load before install: $(cut -d' ' -f1-3 /proc/loadavg)"
make -C "$HERE" --no-print-directory install WHEELHOUSE="$HOUSE" VENV="$VENV"
echo "wheelhouse-check: installed in $(( $(date +%s) - start )) s (load $(cut -d' ' -f1-3 /proc/loadavg)), venv $(du -sh "$VENV" | cut -f1)"
export PATH="$VENV/bin:$PATH"
cd "$(mktemp -d)"  # the imports below must come from the venv, not from the checkout
python - <<'PY'
import horovod, horovod.torch, mlflow, nvidia.dali, torch, webdataset
import glow_dist
print(f"wheelhouse-check: torch {torch.__version__} (CUDA {torch.version.cuda}), horovod {horovod.__version__}, "
      f"nvidia.dali {nvidia.dali.__version__}, webdataset {getattr(webdataset, '__version__', '?')}, "
      f"mlflow {mlflow.__version__}, glow_dist from {glow_dist.__file__}")
PY
horovodrun --check-build | tee check-build.txt
if [ "$FLAVOUR" != cpu ]; then
    grep -q '\[X\] NCCL' check-build.txt || { echo "wheelhouse-check: NCCL missing from Horovod's build" >&2; exit 1; }
fi
glow-dist doctor
horovodrun -np 2 -H localhost:2 --gloo glow-dist doctor
echo "wheelhouse-check: PASS ($FLAVOUR, offline, $(( $(date +%s) - start )) s)"
EOF
