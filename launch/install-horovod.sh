#!/usr/bin/env bash
# Build and install Horovod 0.28.1 with PyTorch + Gloo (and NCCL for a CUDA build of torch) into the Python
# environment given as $1 (default: python3). The wheel is built once and cached in $GLOW_DIST_WHEEL_CACHE
# (default ~/.cache/glow-dist/wheels), one folder per Horovod/torch/CUDA/variant and one wheel per Python, so a
# second install (a fresh clone, a new venv, `make wheelhouse`) takes seconds.
#
# Which build (GLOW_DIST_HOROVOD_GPU, default auto):
#   auto  NCCL when the installed torch is a CUDA build (torch.version.cuda is set), else CPU (Gloo only)
#   nccl  NCCL all-reduce/allgather/broadcast on the GPU, Gloo as the controller; HOROVOD_GPU_OPERATIONS=NCCL in the
#         environment asks for this too (the Dockerfile's spelling)
#   cpu   Gloo only
# GLOW_DIST_HOROVOD_MPI=1 builds MPI in as well (HOROVOD_WITH_MPI=1 beside Gloo; the wheel is cached as its own
# variant, *-mpi): the route `srun --mpi=pmix` of the sbatch script (LAUNCHER=srun-mpi) needs it. It compiles against
# the mpicxx on PATH (Debian: openmpi-bin libopenmpi-dev), and the nodes must run the same MPI build at run time.
# Where CUDA comes from for an NCCL build (GLOW_DIST_CUDA_FROM, default auto):
#   system  $HOROVOD_CUDA_HOME, $CUDA_HOME, the nvcc on PATH or /usr/local/cuda; its major version must be torch's
#   pypi    NVIDIA's toolkit wheels, installed into the same environment at torch's CUDA major.minor:
#           CUDA 13: nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt nvidia-nvvm
#           and merged into one temporary CUDA home for the build. CUDA 12: tried (nvidia-cuda-nvcc-cu12 ...), but
#           those wheels hold no nvcc (12.1-12.9 checked: ptxas and libnvvm only), so a CUDA 12 torch needs a system
#           CUDA 12 toolkit (the Dockerfile's devel image has one)
#   auto    system when its major version matches torch's CUDA, else pypi
# NCCL: $HOROVOD_NCCL_HOME (or _INCLUDE/_LIB) when set, else the nvidia-nccl-cu12/-cu13 wheel that a CUDA torch
# depends on (linked shared: the library torch loads is the one Horovod uses), else the CUDA home.
# GLOW_DIST_HOROVOD_COPY_TO=dir also copies the wheel there (launch/wheelhouse.sh).
# Kernels are compiled for torch's own GPU architectures unless HOROVOD_BUILD_CUDA_CC_LIST says otherwise
# (e.g. 80,90).
#
# Patches to the 0.28.1 sdist (each checked, so a changed sdist fails loudly instead of building something else):
#   - C++17 instead of C++14 for the library, and for the torch extension the standard torch's own extension
#     builder uses: C++17 for torch 2.1-2.13, C++20 from torch 2.14 (its headers use std::strong_ordering)
#   - C++17 instead of C++11 for the CUDA kernels: CUDA 13's CCCL headers reject anything older
set -euo pipefail

PY=${1:-python3}
HVD_VERSION=0.28.1
CACHE=${GLOW_DIST_WHEEL_CACHE:-$HOME/.cache/glow-dist/wheels}

read -r TORCH_VERSION TORCH_CUDA PYTAG SITE TORCH_ARCHS TORCH_STD < <("$PY" - <<'EOF'
import re, sys, sysconfig, torch
import torch.utils.cpp_extension as ext
# The C++ standard torch's headers need: the newest -std= its own extension builder passes (17 up to 2.13, 20 after).
std = max([17] + [int(v) for v in re.findall(r"-std=c\+\+(\d\d)", open(ext.__file__).read())])
archs = ""
if torch.version.cuda:
    try:  # the architectures torch itself was compiled for; needs no GPU
        archs = ",".join(sorted({a.split("_")[1] for a in torch._C._cuda_getArchFlags().split() if a.startswith("sm_")},
                                key=int))
    except Exception:
        pass
print(torch.__version__.replace("+", "_"), torch.version.cuda or "none", f"cp{sys.version_info[0]}{sys.version_info[1]}",
      sysconfig.get_paths()["purelib"], archs or "-", std)
EOF
)
[ -n "${PYTAG:-}" ] || { echo "horovod: cannot import torch with $PY; install torch first" >&2; exit 1; }

GPU=${GLOW_DIST_HOROVOD_GPU:-auto}
[ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ] && GPU=nccl
if [ "$GPU" = auto ]; then GPU=$([ "$TORCH_CUDA" = none ] && echo cpu || echo nccl); fi
case $GPU in
    cpu) VARIANT=cpu ;;
    nccl)
        [ "$TORCH_CUDA" != none ] || {
            echo "horovod: an NCCL build needs a CUDA build of torch; this one ($TORCH_VERSION) is CPU-only" >&2; exit 1; }
        VARIANT=nccl-cu$TORCH_CUDA ;;
    *) echo "horovod: GLOW_DIST_HOROVOD_GPU must be auto, nccl or cpu, got '$GPU'" >&2; exit 1 ;;
esac
MPI=${GLOW_DIST_HOROVOD_MPI:-0}
case $MPI in
    0) ;;
    1) command -v mpicxx >/dev/null || {
           echo "horovod: GLOW_DIST_HOROVOD_MPI=1 needs an MPI compiler wrapper (mpicxx) on PATH; on Debian:" \
                "apt-get install openmpi-bin libopenmpi-dev" >&2; exit 1; }
       VARIANT=$VARIANT-mpi ;;
    *) echo "horovod: GLOW_DIST_HOROVOD_MPI must be 0 or 1, got '$MPI'" >&2; exit 1 ;;
esac
WHEEL_DIR="$CACHE/horovod-$HVD_VERSION-torch$TORCH_VERSION-$VARIANT"
wheel() { ls "$WHEEL_DIR"/horovod-$HVD_VERSION-"$PYTAG"-*.whl 2>/dev/null | head -1; }

if [ -z "${GLOW_DIST_HOROVOD_COPY_TO:-}" ] &&
   "$PY" -c "import sys, horovod.torch as h; sys.exit(0 if h.mpi_built() or '$MPI' == '0' else 1)" 2>/dev/null; then
    echo "horovod: already installed ($("$PY" -c 'import horovod; print(horovod.__version__)'))"
    exit 0
fi

# The CUDA home for an NCCL build: echo its path; install the PyPI toolkit wheels when asked (or needed).
cuda_major() { "$1/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p'; }
find_system_cuda() {
    local c
    for c in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")" \
             /usr/local/cuda; do
        # A toolkit home has the runtime headers next to nvcc (/usr/local/bin/nvcc is often a wrapper script
        # whose folder is no toolkit: skipped, and /usr/local/cuda found after it).
        if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ "$(cuda_major "$c")" = "${TORCH_CUDA%%.*}" ] &&
           { [ -f "$c/include/cuda_runtime.h" ] || compgen -G "$c/targets/*/include/cuda_runtime.h" >/dev/null; }; then
            echo "$c"; return 0
        fi
    done
    return 1
}
pypi_cuda() {
    local major=${TORCH_CUDA%%.*} pin="==$TORCH_CUDA.*" home=$1 pkgs d
    if [ "$major" -ge 13 ]; then
        pkgs="nvidia-cuda-nvcc$pin nvidia-cuda-runtime$pin nvidia-cuda-cccl$pin nvidia-cuda-crt$pin nvidia-nvvm$pin"
    else
        pkgs="nvidia-cuda-nvcc-cu$major$pin nvidia-cuda-runtime-cu$major$pin nvidia-cuda-cccl-cu$major$pin"
    fi
    echo "horovod: CUDA $TORCH_CUDA toolkit from PyPI: $pkgs" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $pkgs >&2
    # CUDA 13 wheels share one tree (nvidia/cu13); CUDA 12 wheels have one folder each. They are merged into one
    # home: the programs are copied (nvcc finds its parts relative to its own file), headers and libraries linked.
    mkdir -p "$home"
    for d in "$SITE/nvidia/cu$major" "$SITE"/nvidia/cuda_nvcc "$SITE"/nvidia/cuda_runtime "$SITE"/nvidia/cuda_cccl \
             "$SITE"/nvidia/cuda_crt "$SITE"/nvidia/nvvm; do
        [ -d "$d" ] || continue
        for sub in bin nvvm; do
            if [ -d "$d/$sub" ]; then mkdir -p "$home/$sub" && cp -r "$d/$sub"/. "$home/$sub"/; fi
        done
        for sub in include lib lib64; do
            if [ -d "$d/$sub" ]; then mkdir -p "$home/$sub" && cp -rsf "$d/$sub"/. "$home/$sub"/; fi
        done
    done
    if [ ! -x "$home/bin/nvcc" ]; then
        echo "horovod: no nvcc in the CUDA $major wheels under $SITE/nvidia" >&2
        # Checked for 12.1, 12.3, 12.4, 12.6, 12.8 and 12.9: nvidia-cuda-nvcc-cu12 holds ptxas and libnvvm only
        # (for JIT users); CUDA 13's nvidia-cuda-nvcc is the first with the compiler driver.
        [ "$major" -ge 13 ] || echo "horovod: PyPI's CUDA 12 wheels carry no nvcc (nvidia-cuda-nvcc-cu12 is ptxas and" \
            "libnvvm only), so an NCCL build for a CUDA 12 torch needs a CUDA 12 toolkit on the machine: set CUDA_HOME" \
            "(or HOROVOD_CUDA_HOME) to it, e.g. /usr/local/cuda-12.8, or build in the nvidia/cuda:12.8.1-cudnn-devel" \
            "image (docker/Dockerfile)" >&2
        return 1
    fi
    [ -e "$home/lib64" ] || ln -s lib "$home/lib64"
    # The wheels ship only versioned shared libraries; the linker wants the plain name.
    [ -e "$home/lib/libcudart.so" ] || ln -s "$(basename "$(ls "$home"/lib/libcudart.so.* | head -1)")" "$home/lib/libcudart.so"
    echo "$home"
}

if [ -z "$(wheel)" ]; then
    echo "horovod: building $HVD_VERSION ($VARIANT) against torch $TORCH_VERSION for $PYTAG (CPU: about 3 min on 2 cores, NCCL: 20-30 min; cached after)"
    work=$(mktemp -d)
    [ -n "${GLOW_DIST_KEEP_BUILD:-}" ] && echo "horovod: keeping the build in $work" || trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-$HVD_VERSION.tar.gz -C "$work"
    src="$work/horovod-$HVD_VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt"
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $TORCH_STD)/" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/CMakeLists.txt" &&
        grep -q "CMAKE_CXX_STANDARD $TORCH_STD" "$src/horovod/torch/CMakeLists.txt" || {
        echo "horovod: the C++$TORCH_STD patch did not apply; the sdist layout changed" >&2; exit 1; }
    # Build requirements, since --no-build-isolation uses this environment's packages.
    "$PY" -m pip install -q cmake packaging psutil cloudpickle pyyaml wheel setuptools
    env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
         "MAKEFLAGS=-j$(nproc)")
    if [ "$MPI" = 1 ]; then env+=(HOROVOD_WITH_MPI=1); else env+=(HOROVOD_WITHOUT_MPI=1); fi
    if [ "$GPU" = nccl ]; then
        cuda_kernels="$src/horovod/common/ops/cuda/CMakeLists.txt"
        sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$cuda_kernels"
        grep -q 'CMAKE_CUDA_STANDARD 17' "$cuda_kernels" || {
            echo "horovod: the CUDA C++17 patch did not apply; the sdist layout changed" >&2; exit 1; }
        from=${GLOW_DIST_CUDA_FROM:-auto}
        cuda_home=
        if [ "$from" != pypi ]; then cuda_home=$(find_system_cuda || true); fi
        if [ -z "$cuda_home" ]; then
            [ "$from" = system ] && {
                echo "horovod: GLOW_DIST_CUDA_FROM=system but no CUDA ${TORCH_CUDA%%.*}.x toolkit was found" \
                     "(HOROVOD_CUDA_HOME, CUDA_HOME, nvcc on PATH, /usr/local/cuda)" >&2; exit 1; }
            cuda_home=$(pypi_cuda "$work/cuda")
            from=pypi
        else
            from=system
        fi
        echo "horovod: CUDA from $from: $cuda_home ($("$cuda_home/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
        # NCCL: the environment's choice, else torch's own nvidia-nccl wheel, else the toolkit.
        nccl_inc=${HOROVOD_NCCL_INCLUDE:-${HOROVOD_NCCL_HOME:+$HOROVOD_NCCL_HOME/include}}
        nccl_lib=${HOROVOD_NCCL_LIB:-${HOROVOD_NCCL_HOME:+$HOROVOD_NCCL_HOME/lib}}
        if [ -z "$nccl_inc" ]; then
            for d in "$SITE/nvidia/nccl" "$SITE/nvidia/cu${TORCH_CUDA%%.*}" "$cuda_home" /usr; do
                if [ -f "$d/include/nccl.h" ]; then nccl_inc=$d/include; nccl_lib=$d/lib; break; fi
            done
        fi
        [ -n "$nccl_inc" ] || { echo "horovod: nccl.h not found; pip install nvidia-nccl-cu${TORCH_CUDA%%.*} or set" \
                                     "HOROVOD_NCCL_HOME" >&2; exit 1; }
        if [ ! -e "$nccl_lib/libnccl.so" ]; then  # the wheel ships libnccl.so.2 only: link against a plain name
            mkdir -p "$work/nccl-lib"
            for d in "$nccl_lib" "$nccl_lib/../lib64" /usr/lib/x86_64-linux-gnu; do
                lib=$(ls "$d"/libnccl.so.* 2>/dev/null | head -1) && [ -n "$lib" ] && break
            done
            [ -n "${lib:-}" ] || { echo "horovod: libnccl.so.2 not found next to $nccl_inc" >&2; exit 1; }
            ln -sf "$lib" "$work/nccl-lib/libnccl.so"
            nccl_lib=$work/nccl-lib
        fi
        echo "horovod: NCCL $(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) *\([0-9]*\).*/\2/p' "$nccl_inc/nccl.h" | paste -sd.) from $nccl_inc"
        cc_list=${HOROVOD_BUILD_CUDA_CC_LIST:-$([ "$TORCH_ARCHS" = - ] || echo "$TORCH_ARCHS")}
        env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED "HOROVOD_CUDA_HOME=$cuda_home"
              "HOROVOD_NCCL_INCLUDE=$nccl_inc" "HOROVOD_NCCL_LIB=$nccl_lib" "PATH=$cuda_home/bin:$PATH"
              "CUDAToolkit_ROOT=$cuda_home" "CUDACXX=$cuda_home/bin/nvcc" HOROVOD_WITHOUT_NVTX=1
              ${cc_list:+"HOROVOD_BUILD_CUDA_CC_LIST=$cc_list"})
        echo "horovod: GPU kernels for compute capabilities ${cc_list:-all that nvcc knows}"
    fi
    mkdir -p "$WHEEL_DIR"
    env "${env[@]}" "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/out" "$src"
    mv "$work"/out/horovod-*.whl "$WHEEL_DIR"/
fi

if [ -n "${GLOW_DIST_HOROVOD_COPY_TO:-}" ]; then cp "$(wheel)" "$GLOW_DIST_HOROVOD_COPY_TO"/; fi
"$PY" -m pip install -q --no-deps "$(wheel)"
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging cffi
echo "horovod: installed $(basename "$(wheel)") from $WHEEL_DIR"
