#!/usr/bin/env bash
# Every wheel glow-dist needs for one CUDA flavour and one Python, in one folder, for air-gapped clusters:
#
#   launch/wheelhouse.sh OUT FLAVOUR [PYTHON] [TORCH_VERSION]      (make wheelhouse CUDA=cu13 PYTHON=python3.12)
#
# FLAVOUR: cpu | cu12 | cu13. OUT receives torch (and for CUDA its nvidia-* runtime wheels), Horovod 0.28.1 built by
# launch/install-horovod.sh for that torch (NCCL + Gloo for CUDA, Gloo for cpu), DALI (nvidia-dali-cuda120 for cpu and
# cu12, nvidia-dali-cuda130 for cu13), this project as a wheel, every dependency, the test tools, and pip/setuptools/
# wheel; plus requirements.txt naming the flavour's torch, Horovod and DALI. Install with no network:
#
#   make install WHEELHOUSE=OUT                                     (a checkout: editable install)
#   pip install --no-index --find-links OUT -r OUT/requirements.txt glow-dist      (a node without the sources)
#
# The wheels are chosen by PYTHON's own pip, so its version and platform are the ones the wheelhouse serves. Torch
# comes from PyTorch's index for the flavour (TORCH_INDEX_URL overrides it; empty: pip's configured indexes only).
# Building Horovod needs torch installed: that happens in a build venv OUT.build-venv, removed at the end.
set -euo pipefail

OUT=${1:?usage: wheelhouse.sh OUT cpu|cu12|cu13 [PYTHON] [TORCH_VERSION]}
FLAVOUR=${2:?usage: wheelhouse.sh OUT cpu|cu12|cu13 [PYTHON] [TORCH_VERSION]}
PYTHON=${3:-python3}
TORCH_VERSION=${4:-2.13.0}
HERE=$(cd "$(dirname "$0")/.." && pwd)

case $FLAVOUR in
    cpu)  default_index=https://download.pytorch.org/whl/cpu;   dali=nvidia-dali-cuda120 ;;
    cu12) default_index=https://download.pytorch.org/whl/cu128; dali=nvidia-dali-cuda120 ;;
    cu13) default_index=https://download.pytorch.org/whl/cu130; dali=nvidia-dali-cuda130 ;;
    *) echo "wheelhouse: FLAVOUR must be cpu, cu12 or cu13, got '$FLAVOUR'" >&2; exit 1 ;;
esac
TORCH_INDEX_URL=${TORCH_INDEX_URL-$default_index}
index=(${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"})

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
venv="$OUT.build-venv"
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
echo "wheelhouse: $FLAVOUR for $("$py" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])') into $OUT"

"$py" -m pip download -q -d "$OUT" pip setuptools wheel
# torch of the flavour, with its runtime wheels; the newest build of that version wins (2.13.0+cu128 over 2.13.0).
"$py" -m pip download -q -d "$OUT" "${index[@]}" "torch==$TORCH_VERSION"
torch_wheel=$(ls "$OUT"/torch-"$TORCH_VERSION"*.whl | head -1)
torch_pin=$(basename "$torch_wheel" | cut -d- -f2)  # e.g. 2.13.0+cpu
case $FLAVOUR in
    cpu) [[ $torch_pin != *+cu* ]] || { echo "wheelhouse: got CUDA torch $torch_pin for cpu" >&2; exit 1; } ;;
esac
printf 'torch==%s\nhorovod==0.28.1\n%s\n' "$torch_pin" "$dali" > "$OUT/requirements.txt"

# This project as a wheel, then everything it needs (torch pinned to the flavour's build by requirements.txt).
"$py" -m pip wheel -q --no-deps -w "$OUT" "$HERE"
"$py" -m pip download -q -d "$OUT" --find-links "$OUT" "${index[@]}" \
    -r <(grep -v '^horovod' "$OUT/requirements.txt") "glow-dist[test]" cmake packaging psutil cloudpickle pyyaml cffi

# Horovod, built (or taken from the cache) against exactly this torch, with NCCL for CUDA flavours.
"$py" -m pip install -q --no-index --find-links "$OUT" "torch==$torch_pin"
GLOW_DIST_HOROVOD_COPY_TO="$OUT" bash "$HERE/launch/install-horovod.sh" "$py"
ls "$OUT"/horovod-0.28.1-*.whl >/dev/null
echo "wheelhouse: $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1); install with: make install WHEELHOUSE=$OUT"
