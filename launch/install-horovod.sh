#!/usr/bin/env bash
# Build and install Horovod 0.28.1 with PyTorch + Gloo into the Python environment given as $1 (default: python3).
#
# Horovod 0.28.1 (the newest release) asks CMake for C++14, but torch >= 2.1 headers need C++17, so the stock
# build fails. We patch the two CMakeLists.txt files to C++17 and build a wheel once; the wheel is cached in
# $GLOW_DIST_WHEEL_CACHE (default ~/.cache/glow-dist/wheels) keyed by the torch version, so a second install
# (a fresh clone, a new venv) takes seconds.
#
# Extra build flags come from the environment, e.g. HOROVOD_GPU_OPERATIONS=NCCL in the GPU image.
set -euo pipefail

PY=${1:-python3}
HVD_VERSION=0.28.1
CACHE=${GLOW_DIST_WHEEL_CACHE:-$HOME/.cache/glow-dist/wheels}
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
VARIANT=${HOROVOD_GPU_OPERATIONS:+nccl}
VARIANT=${VARIANT:-cpu}
WHEEL_DIR="$CACHE/horovod-$HVD_VERSION-torch$TORCH_VERSION-$VARIANT"

if "$PY" -c 'import horovod.torch' 2>/dev/null; then
    echo "horovod: already installed ($("$PY" -c 'import horovod; print(horovod.__version__)'))"
    exit 0
fi

if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    echo "horovod: building $HVD_VERSION against torch $TORCH_VERSION (about 3 minutes on 2 cores; cached after)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-$HVD_VERSION.tar.gz -C "$work"
    src="$work/horovod-$HVD_VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || {
        echo "horovod: the C++17 patch did not apply; the sdist layout changed" >&2; exit 1; }
    # Build requirements, since --no-build-isolation uses this environment's packages.
    "$PY" -m pip install -q cmake packaging psutil cloudpickle pyyaml wheel setuptools
    mkdir -p "$WHEEL_DIR"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEEL_DIR.tmp" "$src"
    mv "$WHEEL_DIR.tmp"/horovod-*.whl "$WHEEL_DIR"/ && rmdir "$WHEEL_DIR.tmp"
fi

"$PY" -m pip install -q --no-deps "$WHEEL_DIR"/horovod-*.whl
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging
echo "horovod: installed from $WHEEL_DIR"
