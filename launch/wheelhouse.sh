#!/usr/bin/env bash
# Every wheel glow-dist needs for one CUDA flavour and one Python, in one folder, for air-gapped clusters:
#
#   launch/wheelhouse.sh OUT FLAVOUR [PYTHON] [TORCH_VERSION]      (make wheelhouse CUDA=cu13 PYTHON=python3.12)
#
# FLAVOUR: cpu | cu12 | cu13. OUT receives torch (and for CUDA its nvidia-* runtime wheels), Horovod 0.28.1 built by
# launch/install-horovod.sh for that torch (NCCL + Gloo for CUDA, Gloo for cpu), DALI (nvidia-dali-cuda120 for cpu and
# cu12, nvidia-dali-cuda130 for cu13), this project as a wheel, every dependency, the test tools, and pip/setuptools/
# wheel; plus requirements.txt pinning the flavour's torch, Horovod and DALI. Install with no network:
#
#   make install WHEELHOUSE=OUT                                     (a checkout: editable install)
#   pip install --no-index --find-links OUT -r OUT/requirements.txt glow-dist      (a node without the sources)
#
# The wheels are chosen by PYTHON's own pip, so its version and platform are the ones the wheelhouse serves.
# Where torch comes from: TORCH_INDEX (an extra index URL; empty: pip's configured indexes, i.e. PyPI). Defaults:
#   cpu   2.13.0 from PyTorch's CPU index (https://download.pytorch.org/whl/cpu): PyPI's Linux torch is a CUDA build
#   cu13  2.14.1 from PyPI: PyPI's Linux torch has been the CUDA 13.0 build since 2.11
#   cu12  2.10.0 from PyPI, the last PyPI torch built for CUDA 12 (12.8); a newer torch for CUDA 12 comes only from
#         PyTorch's index: TORCH_INDEX=https://download.pytorch.org/whl/cu128 and 2.14.1 as TORCH_VERSION (make:
#         WHEELHOUSE_TORCH=2.14.1). Horovod's NCCL build for CUDA 12 needs a local CUDA 12 toolkit (CUDA_HOME):
#         PyPI has no CUDA 12 nvcc; without one (or the build in the wheel cache) cu12 stops before the downloads.
# (TORCH_INDEX_URL is the old spelling of TORCH_INDEX.) Whatever the index, the torch wheel's own metadata must name
# the flavour's CUDA major (or none, for cpu), else the script stops before building anything.
# Building Horovod needs torch installed: that happens in a build venv OUT.build-venv, removed at the end.
set -euo pipefail

OUT=${1:?usage: wheelhouse.sh OUT cpu|cu12|cu13 [PYTHON] [TORCH_VERSION]}
FLAVOUR=${2:?usage: wheelhouse.sh OUT cpu|cu12|cu13 [PYTHON] [TORCH_VERSION]}
PYTHON=${3:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)

case $FLAVOUR in
    cpu)  default_index=https://download.pytorch.org/whl/cpu; default_torch=2.13.0; dali=nvidia-dali-cuda120 ;;
    cu12) default_index=;                                     default_torch=2.10.0; dali=nvidia-dali-cuda120 ;;
    cu13) default_index=;                                     default_torch=2.14.1; dali=nvidia-dali-cuda130 ;;
    *) echo "wheelhouse: FLAVOUR must be cpu, cu12 or cu13, got '$FLAVOUR'" >&2; exit 1 ;;
esac
TORCH_VERSION=${4:-$default_torch}
TORCH_INDEX=${TORCH_INDEX-${TORCH_INDEX_URL-$default_index}}
index=(${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"})

from=${TORCH_INDEX:-the configured indexes (PyPI)}
echo "wheelhouse: $FLAVOUR into $OUT: torch $TORCH_VERSION from $from, $dali"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
venv="$OUT.build-venv"
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
echo "wheelhouse: Python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# torch alone first: its flavour is checked before gigabytes of runtime wheels are fetched. Of several builds of the
# version the newest wins (2.13.0+cu128 over 2.13.0).
"$py" -m pip download -q --no-deps -d "$OUT" "${index[@]}" "torch==$TORCH_VERSION"
torch_wheel=$(ls "$OUT"/torch-"$TORCH_VERSION"[-+]*.whl | head -1)
torch_pin=$(basename "$torch_wheel" | cut -d- -f2)  # e.g. 2.13.0+cpu, or 2.14.1 for PyPI's (CUDA) build
got=$("$py" "$HERE/launch/torch_flavour.py" "$torch_wheel")
if [ "$got" != "$FLAVOUR" ]; then
    echo "wheelhouse: $(basename "$torch_wheel") is a $got build, not $FLAVOUR; choose its source with" \
         "TORCH_INDEX=<PyTorch's index for $FLAVOUR> and WHEELHOUSE_TORCH/TORCH_VERSION (see $0)" >&2
    exit 1
fi
echo "wheelhouse: $(basename "$torch_wheel") is a $got build"

# cu12: Horovod's NCCL build needs a CUDA 12 nvcc, which PyPI does not have (launch/install-horovod.sh). Unless the
# wheel cache already holds the build, say so now rather than after gigabytes of downloads.
if [ "$FLAVOUR" = cu12 ] && [ "${GLOW_DIST_HOROVOD_GPU:-auto}" != cpu ] &&
   ! compgen -G "${GLOW_DIST_WHEEL_CACHE:-$HOME/.cache/glow-dist/wheels}/horovod-0.28.1-torch${torch_pin%%+*}*-nccl-cu12.*/*.whl" \
       >/dev/null; then
    found=
    for c in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc || echo /x/x)")")" \
             /usr/local/cuda; do
        if [ -n "$c" ] && "$c/bin/nvcc" --version 2>/dev/null | grep 'release 12\.' >/dev/null; then found=$c; break; fi
    done
    [ -n "$found" ] || {
        echo "wheelhouse: cu12 needs a CUDA 12 toolkit to build Horovod with NCCL (PyPI's nvidia-cuda-nvcc-cu12 has" \
             "no nvcc) and none was found (HOROVOD_CUDA_HOME, CUDA_HOME, nvcc on PATH, /usr/local/cuda); set" \
             "CUDA_HOME=/usr/local/cuda-12.x, or put a built wheel in the cache" >&2
        exit 1
    }
    echo "wheelhouse: CUDA 12 toolkit for Horovod's build: $found"
fi

"$py" -m pip download -q -d "$OUT" pip setuptools wheel
# This project as a wheel, then everything it needs (torch pinned to the flavour's build).
"$py" -m pip wheel -q --no-deps -w "$OUT" "$HERE"
"$py" -m pip download -q -d "$OUT" --find-links "$OUT" "${index[@]}" \
    "torch==$torch_pin" "$dali" "glow-dist[test]" cmake packaging psutil cloudpickle pyyaml cffi
dali_wheel=$(ls "$OUT/${dali//-/_}"-*.whl | head -1)
printf 'torch==%s\nhorovod==0.28.1\n%s==%s\n' "$torch_pin" "$dali" "$(basename "$dali_wheel" | cut -d- -f2)" \
    > "$OUT/requirements.txt"

# Horovod, built (or taken from the cache) against exactly this torch, with NCCL for CUDA flavours.
"$py" -m pip install -q --no-index --find-links "$OUT" "torch==$torch_pin"
GLOW_DIST_HOROVOD_COPY_TO="$OUT" bash "$HERE/launch/install-horovod.sh" "$py"
ls "$OUT"/horovod-0.28.1-*.whl >/dev/null
echo "wheelhouse: $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1); install with: make install WHEELHOUSE=$OUT"
