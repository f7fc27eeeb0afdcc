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

.PHONY: install horovod horovod-gpu-check wheelhouse wheelhouse-check doctor test test-slurm test-fast lint train prepare-digits mlflow-ui mlflow-screenshot bench clean help docker-build docker-train

help:
	@echo "make train      install, prepare the digits shards, train with 2 Horovod processes, log to local MLflow"
	@echo "make test       install, then run the whole test suite"
	@echo "make test-slurm the sbatch script on a real local two-node Slurm cluster (root): stop paths, a lost node"
	@echo "make install    project venv ($(VENV)) with torch==$(TORCH_VERSION) (CPU), the package and its deps"
	@echo "make horovod    build (once, cached) and install Horovod with PyTorch + Gloo"
	@echo "make doctor     check this machine: torch/CUDA, GPUs, Horovod build, DALI decode, MLflow, data"
	@echo "make horovod-gpu-check  CUDA torch + toolkit wheels in $(GPU_VENV), build Horovod with NCCL, check it"
	@echo "make wheelhouse CUDA=cu12|cu13|cpu [PYTHON=python3.12] [WHEELHOUSE_TORCH=2.14.1 TORCH_INDEX=url]: every wheel for an offline install"
	@echo "make install WHEELHOUSE=dir  install from a wheelhouse with no network"
	@echo "make wheelhouse-check WHEELHOUSE=dir  prove it: offline install into a fresh venv, --check-build, doctor"
	@echo "make lint       ruff over the package, tests, benchmarks and launch scripts; the layering (import-linter)"
	@echo "make mlflow-ui  MLflow UI on the local store (http://127.0.0.1:$(MLFLOW_PORT))"
	@echo "make bench      benchmark suite; prints tables (see BENCHMARKS.md)"
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

# The engines' own suites (a private dockerd, a local Slurm cluster) are separate targets, run by .ci/run after this.
ENGINE_TESTS := not docker and not slurm

test: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m "$(ENGINE_TESTS)" $(PYTEST_ARGS)

# The project's sbatch script on a real two-node Slurm cluster on this machine (launch/slurm/local-cluster.sh; root,
# network namespaces; installs slurm-wlm and munge if missing): every stop path and a lost node. About 5 minutes.
# Its own --basetemp: the cluster's files (munge's socket, slurm.conf) live there for the whole run, and another pytest
# session on the machine prunes old directories under the shared default.
SLURM_TEST_TMP ?= /tmp/glow-dist-test-slurm
test-slurm: $(STAMP) $(HVD_STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -rP -m slurm --basetemp=$(SLURM_TEST_TMP) tests/test_slurm.py $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH=$(BIN):$$PATH $(PY) -m pytest -q -m "not slow and $(ENGINE_TESTS)" $(PYTEST_ARGS)

# ruff, and the package's layering (import-linter contracts in pyproject.toml: no upward import, no cycle).
lint: $(STAMP)
	$(BIN)/ruff check glow_dist tests bench launch
	$(BIN)/lint-imports

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

# GPU machines: the image of docker/Dockerfile, and a training run in it on all local GPUs.
# make docker-train CONFIG=configs/celeba_hq_256.yaml DATA=/data/celeba_hq_256 RUN_DIR=/runs/celeba GPUS=8 \
#     TRACKING_URI=http://mlflow-host:5000
IMAGE ?= glow-dist:latest
CONFIG ?= configs/digits.yaml
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
TRACKING_URI ?= $(MLFLOW_TRACKING_URI)
# `docker stop` waits this long before SIGKILL: twice bench/bench_stop.py's stop budget, 24 s, rounded up to 30 s
# (docker's default, 10 s, is less than a checkpoint takes; README, Grace periods)
STOP_GRACE ?= 60

docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) .

# Host network: NCCL and the tracking server as on the host. Configs are mounted, so edits need no rebuild;
# without TRACKING_URI runs go to a sqlite store inside RUN_DIR. Files are written as the calling user.
docker-train:
	@[ "$(GPUS)" -ge 1 ] 2>/dev/null || { echo "docker-train: no GPU found; set GPUS=N" >&2; exit 2; }
	mkdir -p $(RUN_DIR)
	docker run --rm --gpus all --network host --ipc host --ulimit memlock=-1 --stop-timeout $(STOP_GRACE) \
		--user $$(id -u):$$(id -g) -e HOME=/tmp \
		-v $(abspath $(DATA)):/data:ro -v $(abspath $(RUN_DIR)):/runs -v $(CURDIR)/configs:/workspace/glow-dist/configs:ro \
		$(IMAGE) glow-dist-horovodrun -np $(GPUS) -H localhost:$(GPUS) --gloo \
		glow-dist train --config $(CONFIG) data.root=/data train.run_dir=/runs \
		tracking.uri=$(TRACKING_URI) tracking.local_dir=/runs/mlflow $(TRAIN_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
