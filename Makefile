# glow-dist: the two commands a new user runs are `make train` and `make test`.
# Every target installs what it needs first; installs are stamped, so a second run is quick.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.glow-dist-installed
HVD_STAMP := $(VENV)/.horovod-installed

DATA ?= data/digits
RUN_DIR ?= runs/digits
NP ?= 2
TRAIN_ARGS ?=
MLFLOW_PORT ?= 5000

.PHONY: install horovod horovod-mpi horovod-gpu-check wheelhouse wheelhouse-check doctor test test-slurm test-hosts test-s3 test-drills test-fast lint docs train prepare-digits mlflow-ui mlflow-screenshot bench clean help docker-build docker-train

help:
	@echo "make train      install, prepare the digits shards, train with 2 Horovod processes, log to local MLflow"
	@echo "make test       install, then run the whole test suite"
	@echo "make test-slurm the sbatch script on a real local two-node Slurm cluster (root): stop paths, a lost node"
	@echo "make test-hosts two hosts in network namespaces (root): ssh training, secrets, lost and hung peers"
	@echo "make test-s3    object storage: a real S3 server (SeaweedFS) on 127.0.0.1"
	@echo "make test-drills stop and crash drills on running jobs: signals, SIGKILL, a full disk, elastic"
	@echo "make install    project venv ($(VENV)) with torch==$(TORCH_VERSION) (CPU), the package and its deps"
	@echo "make horovod    build (once, cached) and install Horovod with PyTorch + Gloo"
	@echo "make horovod-mpi  the same with MPI too, in $(MPI_VENV) (the sbatch script's LAUNCHER=srun-mpi)"
	@echo "make doctor     check this machine: torch/CUDA, GPUs, Horovod build, DALI decode, MLflow, data"
	@echo "make horovod-gpu-check  CUDA torch + toolkit wheels in $(GPU_VENV), build Horovod with NCCL, check it"
	@echo "make wheelhouse CUDA=cu12|cu13|cpu [PYTHON=python3.12] [WHEELHOUSE_TORCH=2.14.1 TORCH_INDEX=url]: every wheel for an offline install"
	@echo "make install WHEELHOUSE=dir  install from a wheelhouse with no network"
	@echo "make wheelhouse-check WHEELHOUSE=dir  prove it: offline install into a fresh venv, --check-build, doctor"
	@echo "make docs       the docs site (mkdocs build --strict) in site/; reference pages generated from the code"
	@echo "make lint       ruff over the package, tests, benchmarks, launch scripts and the docs generator; the layering (import-linter)"
	@echo "make mlflow-ui  MLflow UI on the local store (http://127.0.0.1:$(MLFLOW_PORT))"
	@echo "make bench      benchmark suite; prints tables (see BENCHMARKS.md)"
	@echo "make docker-train  train in the image (GPU flavour on GPU machines; else CPU: digits, $(NP) ranks, built offline)"
	@echo "make docker-daemon / docker-daemon-stop  a private dockerd (root, no systemd: launch/dockerd-private.sh)"
	@echo "make docker-base  a Debian base image by debootstrap, where no registry can be reached"
	@echo "make docker-build FLAVOUR=gpu GPU_WHEELHOUSE=wheelhouse/cu13  the GPU image offline on that base (no CUDA base)"
	@echo "make test-docker  the Docker suite (own dockerd, CPU image, training and stops in containers)"
	@echo "make bench-quality  test bits/dim (EMA and raw) on natural-image patches at 200/400/800 steps"

# WHEELHOUSE=dir (from `make wheelhouse`): install everything from that folder, with no network at all.
WHEELHOUSE ?=
OFFLINE := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)))

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(OFFLINE) --upgrade pip wheel setuptools

# torch is pinned to the local CPU build first, so no dependency pulls a CUDA build. From a wheelhouse, its
# requirements.txt names the flavour's torch, DALI and Horovod instead.
$(STAMP): pyproject.toml | $(PY)
ifeq ($(WHEELHOUSE),)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dali,test]"
else
	$(PY) -m pip install -q $(OFFLINE) -r $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip install -q $(OFFLINE) -e ".[test]"
endif
	@touch $@

install: $(STAMP)

$(HVD_STAMP): $(STAMP) launch/install-horovod.sh
	bash launch/install-horovod.sh $(PY)
	PATH=$(BIN):$$PATH $(BIN)/horovodrun --check-build
	@touch $@

horovod: $(HVD_STAMP)

# The Horovod of the sbatch script's LAUNCHER=srun-mpi (docs/cluster/slurm.md, "The srun-mpi route"): MPI built in
# beside Gloo, in a venv of its own (never the default one), against the MPI on this machine (Debian: openmpi-bin
# libopenmpi-dev; Slurm's mpi/pmix plugin needs libpmix2). tests/test_slurm.py runs the srun-mpi route with it.
MPI_VENV ?= .venv-mpi
horovod-mpi:
	GLOW_DIST_HOROVOD_MPI=1 $(MAKE) horovod VENV=$(MPI_VENV)

doctor: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/glow-dist doctor $(DOCTOR_ARGS)

# The GPU build of Horovod, proven without a GPU: a separate venv with a CUDA build of torch (several GB, never in
# the default install) and NVIDIA's toolkit wheels, Horovod built with NCCL (CUDA_FROM=pypi: nvcc, cudart and CCCL
# from PyPI; system: a local toolkit of torch's CUDA major; auto: system when it matches), then --check-build must
# list NCCL. Not part of `make test`.
GPU_VENV ?= .venv-gpu
GPU_TORCH_VERSION ?= 2.14.1
CUDA_FROM ?= pypi

horovod-gpu-check:
	[ -x $(GPU_VENV)/bin/python ] || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q "torch==$(GPU_TORCH_VERSION)" numpy
	$(GPU_VENV)/bin/python -c 'import sys, torch; sys.exit(None if torch.version.cuda else \
		f"torch {torch.__version__} is not a CUDA build; set GPU_TORCH_VERSION to one")'
	GLOW_DIST_HOROVOD_GPU=nccl GLOW_DIST_CUDA_FROM=$(CUDA_FROM) bash launch/install-horovod.sh $(GPU_VENV)/bin/python
	PATH=$(GPU_VENV)/bin:$$PATH $(GPU_VENV)/bin/horovodrun --check-build | tee $(GPU_VENV)/check-build.txt
	@grep -q '\[X\] NCCL' $(GPU_VENV)/check-build.txt && echo "horovod-gpu-check: NCCL is built in" || \
		{ echo "horovod-gpu-check: NCCL missing from the build" >&2; exit 1; }

# Every wheel for an air-gapped install, for one CUDA flavour (cu12 | cu13 | cpu) and the Python of $(PYTHON):
# torch, Horovod built for that torch (NCCL for CUDA), DALI, this project and all dependencies, in $(WHEELHOUSE)
# (default wheelhouse/$(CUDA)). Then on the cluster: make install WHEELHOUSE=wheelhouse/$(CUDA).
# WHEELHOUSE_TORCH (a torch version) and TORCH_INDEX (an extra index URL) override the flavour's defaults
# (launch/wheelhouse.sh: cpu 2.13.0 from PyTorch's CPU index, cu13 2.14.1 and cu12 2.10.0 from PyPI).
CUDA ?= cu13
WHEELHOUSE_TORCH ?=
wheelhouse:
	$(if $(filter undefined,$(origin TORCH_INDEX)),,TORCH_INDEX='$(TORCH_INDEX)') bash launch/wheelhouse.sh \
		$(or $(WHEELHOUSE),wheelhouse/$(CUDA)) $(CUDA) $(PYTHON) $(WHEELHOUSE_TORCH)

# The offline proof of a wheelhouse: a fresh venv, `make install WHEELHOUSE=` with no index, no pip configuration and
# (where the kernel allows) no network at all, then imports, horovodrun --check-build (NCCL for cu12/cu13) and
# glow-dist doctor on 1 and 2 ranks. Multi-GB for a CUDA flavour: not part of `make test`.
CHECK_VENV ?=
wheelhouse-check:
	bash launch/wheelhouse-check.sh $(or $(WHEELHOUSE),wheelhouse/$(CUDA)) $(CHECK_VENV)

# The engines' own suites (a private dockerd, a local Slurm cluster, an object store), the two-host suites and the stop
# and crash drills are separate targets, run by .ci/run after this (make test alone stays under 20 minutes on a fresh
# 2-core machine).
ENGINE_TESTS := not docker and not slurm and not hosts and not s3 and not drills

test: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m "$(ENGINE_TESTS)" $(PYTEST_ARGS)

# The project's sbatch script on a real two-node Slurm cluster on this machine (launch/slurm/local-cluster.sh; root,
# network namespaces; installs slurm-wlm and munge if missing): every stop path and a lost node. About 5 minutes.
# Its own --basetemp: the cluster's files (munge's socket, slurm.conf) live there for the whole run, and another pytest
# session on the machine prunes old directories under the shared default.
SLURM_TEST_TMP ?= /tmp/glow-dist-test-slurm
test-slurm: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -rP -m slurm --basetemp=$(SLURM_TEST_TMP) tests/test_slurm.py $(PYTEST_ARGS)

# Object storage (marker s3; test-s3 below): a real S3 server (SeaweedFS, the `s3test` extra) on 127.0.0.1.
S3_STAMP := $(VENV)/.glow-dist-s3test
$(S3_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[s3test]"
	@touch $@

# Two hosts in network namespaces, each with its own sshd (launch/netns-hosts.sh; root): training over ssh, secrets
# off every command line, the lost-peer drills (a dead link, a frozen rank, a stalled step), and each host filling its
# own shard cache from an S3 server inside hostA (SeaweedFS: the s3test extra). About 8 minutes.
test-hosts: $(STAMP) $(HVD_STAMP) $(S3_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -rP -m hosts $(PYTEST_ARGS)

test-s3: $(STAMP) $(HVD_STAMP) $(S3_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -rP -m s3 $(PYTEST_ARGS)

# Stop and crash drills on running jobs (marker drills): every way a scheduler or a user stops a job (signals to the
# group, to every process, to the launcher alone, Slurm's warning), SIGKILL mid-run and mid-checkpoint, a disk that
# fills (root: a small tmpfs), elastic workers killed and rejoining. About 7 minutes on a 2-core machine.
test-drills: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m drills $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m "not slow and $(ENGINE_TESTS)" $(PYTEST_ARGS)

# ruff, and the package's layering (import-linter contracts in pyproject.toml: no upward import, no cycle).
lint: $(STAMP)
	$(BIN)/ruff check glow_dist tests bench launch docs
	$(BIN)/lint-imports

# The docs site (mkdocs.yml, docs/) in site/. The reference pages (config keys, command line, shipped configs,
# modules) and the benchmarks page are generated from the code and BENCHMARKS.md at every build (docs/gen_reference.py);
# --strict fails on a broken link or anchor and on a page left out of the navigation.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

prepare-digits: $(STAMP)
	@if [ -f $(DATA)/manifest.json ]; then echo "digits shards present in $(DATA)"; \
	else $(BIN)/glow-dist prepare digits --out $(DATA); fi

train: $(STAMP) $(HVD_STAMP) prepare-digits
	PATH=$(BIN):$$PATH $(BIN)/glow-dist-horovodrun -np $(NP) -H localhost:$(NP) --gloo \
		$(BIN)/glow-dist train --config configs/digits.yaml data.root=$(DATA) train.run_dir=$(RUN_DIR) $(TRAIN_ARGS)
	$(BIN)/glow-dist evaluate --checkpoint $(RUN_DIR) --baseline
	@echo "Review the run in MLflow: make mlflow-ui, then open http://127.0.0.1:$(MLFLOW_PORT) (experiment glow-dist-digits)"

# The README's run-page screenshot (docs/mlflow-run-page.png), from a fresh run on a throwaway server; needs chromium.
mlflow-screenshot: $(STAMP)
	CONFIG=$${CONFIG:-configs/digits.yaml} STEPS=$${STEPS:-1500} EVERY=$${EVERY:-500} bash launch/mlflow-screenshot.sh

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
		--default-artifact-root $(CURDIR)/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

bench: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) bench/run_all.py

# Model quality on natural images (test bits/dim of EMA and raw weights vs the port's recipe): 3 CPU runs of 800 steps.
.PHONY: bench-quality
bench-quality: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	nice -n 10 $(PY) bench/bench_quality.py --ema-study $(BENCH_ARGS)

# Docker (docs/cluster/docker.md): docker/Dockerfile in two flavours, gpu where `nvidia-smi` finds GPUs, else cpu.
# GPU machines:
# make docker-train CONFIG=configs/celeba_hq_256.yaml DATA=/data/celeba_hq_256 RUN_DIR=/runs/celeba GPUS=8 \
#     TRACKING_URI=http://mlflow-host:5000
# A CPU machine: make docker-train trains the digits with $(NP) Gloo ranks in one container of the CPU image, which
# is built first (offline, from wheelhouse/cpu, on a debootstrap base made here) when missing or out of date.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
FLAVOUR ?= $(if $(filter-out 0,$(strip $(GPUS))),gpu,cpu)
IMAGE ?= $(if $(filter cpu,$(FLAVOUR)),glow-dist:cpu,glow-dist:latest)
CONFIG ?= configs/digits.yaml
TRACKING_URI ?= $(MLFLOW_TRACKING_URI)
# `docker stop` waits this long before SIGKILL: twice bench/bench_stop.py's stop budget, 24 s, rounded up to 30 s
# (docker's default, 10 s, is less than a checkpoint takes; docs/stopping.md, Grace periods)
STOP_GRACE ?= 60
CONTAINER ?= glow-dist-train
# The CPU image: a base image with Python 3.10+ (made by `make docker-base` where none can be pulled) and a wheelhouse
# for its Python (bookworm: 3.11; built with the host's $(PYTHON), which must be the same version).
DOCKER_BASE ?= debian-local:bookworm
CPU_WHEELHOUSE ?= wheelhouse/cpu
# The GPU image without a registry: GPU_WHEELHOUSE=dir (make wheelhouse CUDA=cu13; made here if missing, for $(CUDA))
# builds FLAVOUR=gpu on $(DOCKER_BASE) instead of the CUDA base, offline. The wheelhouse may live anywhere: the build
# context is launch/docker-context.sh's tar, with the wheelhouse in it as wheelhouse/<its folder's name>.
GPU_WHEELHOUSE ?=
DOCKER_WHEELHOUSE := $(if $(filter cpu,$(FLAVOUR)),$(CPU_WHEELHOUSE),$(GPU_WHEELHOUSE))
DOCKER_CONTEXT := $(if $(and $(filter gpu,$(FLAVOUR)),$(GPU_WHEELHOUSE)),-,.)
DOCKER_BUILD_ARGS ?= $(if $(filter cpu,$(FLAVOUR)),--build-arg FLAVOUR=cpu --build-arg BASE_IMAGE=$(DOCKER_BASE) \
	--build-arg WHEELHOUSE=$(CPU_WHEELHOUSE),$(if $(GPU_WHEELHOUSE),--build-arg BASE_IMAGE=$(DOCKER_BASE) \
	--build-arg WHEELHOUSE=wheelhouse/$(notdir $(abspath $(GPU_WHEELHOUSE)))))
# Ranks in the container: every GPU, or NP CPU processes.
RANKS := $(if $(filter cpu,$(FLAVOUR)),$(NP),$(GPUS))
# Runs of `make docker-train` get their own run directory (unless RUN_DIR is given), and log to the same MLflow store
# and experiment as `make train`: the checkout's mlflow/, mounted at the same path (the store records absolute paths).
DOCKER_RUN_DIR := $(if $(filter file,$(origin RUN_DIR)),runs/digits-docker,$(RUN_DIR))
MLFLOW_DIR ?= mlflow
MLFLOW_STORE := $(abspath $(MLFLOW_DIR))
# More `docker run` options for the training container, e.g. DOCKER_RUN_ARGS="-e NCCL_DEBUG=INFO".
DOCKER_RUN_ARGS ?=
# The GPU flavour's own `docker run` options; DOCKER_GPU_ARGS= runs the GPU image on the CPU (tests/test_docker.py).
DOCKER_GPU_ARGS ?= $(if $(filter gpu,$(FLAVOUR)),--gpus all --ulimit memlock=-1)
# Credentials set in this environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*, *_TOKEN: the set is defined once,
# in glow_dist/distributed/credentials.py) go into the containers by name: `-e NAME`, whose value docker copies from
# its own environment. `-e NAME=value` would put the secret on make's and docker's command lines, which `ps` shows.
DOCKER_ENV_ARGS = $(shell $(PYTHON) -m glow_dist.distributed.credentials docker-env)
# The private engine of launch/dockerd-private.sh, when no other is configured (no DOCKER_HOST, no system socket).
ifeq ($(origin DOCKER_HOST)$(wildcard /var/run/docker.sock),undefined)
PRIVATE_DOCKER_SOCK := $(shell bash launch/dockerd-private.sh sock)
ifneq ($(wildcard $(PRIVATE_DOCKER_SOCK)),)
export DOCKER_HOST := unix://$(PRIVATE_DOCKER_SOCK)
endif
endif

.PHONY: docker-check docker-daemon docker-daemon-stop docker-base test-docker
docker-check:
	@docker version >/dev/null 2>&1 || { echo "docker: no Docker daemon reachable ($${DOCKER_HOST:-/var/run/docker.sock})." \
		"Start one: systemctl start docker; or, as root without systemd: make docker-daemon" \
		"(launch/dockerd-private.sh start; the Makefile then finds its socket)" >&2; exit 2; }

docker-daemon:
	bash launch/dockerd-private.sh start

docker-daemon-stop:
	bash launch/dockerd-private.sh stop

# A Debian bookworm base from the machine's apt mirror (debootstrap), for machines that cannot pull images.
docker-base: docker-check
	bash launch/docker-base.sh $(DOCKER_BASE)

# torch from PyTorch's CPU index where that name resolves; else from pip's configured indexes (an unreachable index
# would cost pip's retries on every package; the wheelhouse script refuses a torch that is not a CPU build).
$(CPU_WHEELHOUSE)/requirements.txt:
	TORCH_INDEX=$$(getent hosts download.pytorch.org >/dev/null && echo https://download.pytorch.org/whl/cpu) \
		bash launch/wheelhouse.sh $(CPU_WHEELHOUSE) cpu $(PYTHON)

ifneq ($(GPU_WHEELHOUSE),)
$(GPU_WHEELHOUSE)/requirements.txt:
	bash launch/wheelhouse.sh $(GPU_WHEELHOUSE) $(CUDA) $(PYTHON)
endif

# Host network for RUN steps: engines without a bridge (the private one) have no other.
# DOCKER_TARGET=build stops at the build stage (the venv before the project; tagging it keeps its layer cache alive
# through `docker image prune`, which tests/test_docker.py runs).
docker-build: docker-check $(if $(DOCKER_WHEELHOUSE),$(DOCKER_WHEELHOUSE)/requirements.txt)
	$(if $(DOCKER_WHEELHOUSE),docker image inspect $(DOCKER_BASE) >/dev/null 2>&1 || bash launch/docker-base.sh $(DOCKER_BASE))
	$(if $(filter -,$(DOCKER_CONTEXT)),set -o pipefail; bash launch/docker-context.sh $(GPU_WHEELHOUSE) | )docker build \
		--network host -f docker/Dockerfile $(DOCKER_BUILD_ARGS) $(if $(DOCKER_TARGET),--target $(DOCKER_TARGET)) \
		-t $(IMAGE) $(DOCKER_CONTEXT)

# Host network: NCCL, Gloo and the tracking server as on the host. Configs are mounted, so edits need no rebuild;
# without TRACKING_URI runs go to the checkout's mlflow/ store, as `make train`'s do. Files are written as the
# calling user. The digits are prepared in the container when DATA has none.
docker-train: docker-build
	@[ "$(RANKS)" -ge 1 ] 2>/dev/null || { echo "docker-train: no GPU found; set GPUS=N (or FLAVOUR=cpu NP=N)" >&2; exit 2; }
	mkdir -p $(DOCKER_RUN_DIR) $(DATA) $(MLFLOW_STORE)
	[ -f $(DATA)/manifest.json ] || docker run --rm --network host --user $$(id -u):$$(id -g) -e HOME=/tmp \
		-v $(abspath $(DATA)):/data $(IMAGE) glow-dist prepare digits --out /data
	docker run --rm --name $(CONTAINER) $(DOCKER_GPU_ARGS) \
		--network host --ipc host --stop-timeout $(STOP_GRACE) --user $$(id -u):$$(id -g) -e HOME=/tmp \
		-v $(abspath $(DATA)):/data:ro -v $(abspath $(DOCKER_RUN_DIR)):/runs -v $(MLFLOW_STORE):$(MLFLOW_STORE) \
		-v $(CURDIR)/configs:/workspace/glow-dist/configs:ro $(DOCKER_ENV_ARGS) $(DOCKER_RUN_ARGS) \
		$(IMAGE) glow-dist-horovodrun -np $(RANKS) -H localhost:$(RANKS) --gloo \
		glow-dist train --config $(CONFIG) data.root=/data train.run_dir=/runs \
		tracking.uri=$(TRACKING_URI) tracking.local_dir=$(MLFLOW_STORE) $(TRAIN_ARGS)
	docker run --rm $(DOCKER_GPU_ARGS) --network host --user $$(id -u):$$(id -g) -e HOME=/tmp \
		-v $(abspath $(DATA)):/data:ro -v $(abspath $(DOCKER_RUN_DIR)):/runs -v $(MLFLOW_STORE):$(MLFLOW_STORE) \
		$(DOCKER_ENV_ARGS) $(IMAGE) glow-dist evaluate --checkpoint /runs --baseline
	@echo "Review the run in MLflow: make mlflow-ui, then open http://127.0.0.1:$(MLFLOW_PORT)"

# The Docker suite (tests/test_docker.py, marker docker): its own private dockerd, the CPU image, training, stops.
test-docker: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m docker tests/test_docker.py $(PYTEST_ARGS)

clean:
	rm -rf runs site .pytest_cache .ruff_cache
