"""`make docker-train` for real, on a Docker engine of its own: the CPU image built offline from wheelhouse/cpu on a
debootstrap base, training in one container with 2 Gloo ranks against the same run outside it, `docker stop` in the
middle of a run and the next `make docker-train` resuming it exactly, and `docker kill` in the middle of the stop
checkpoint. Marker `docker`: `make test-docker` (which .ci/run calls after `make test`), never `make test`.

The engine is launch/dockerd-private.sh's, with its own root (~/.cache/glow-dist/docker-test: the layer cache is
kept between sessions, so only the first build is cold), stopped by its pid at the end with nothing left mounted.
Where no engine can start here (not root, no dockerd, the kernel refuses), the tests skip and say why."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO, env_with_venv, wait_for
from mlflow.tracking import MlflowClient

from glow_dist.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DOCKER_ROOT = Path.home() / ".cache" / "glow-dist" / "docker-test"
SCRIPT = REPO / "launch" / "dockerd-private.sh"
# Short digits runs: nothing periodic but metrics, so the only checkpoints are the final or the stop's.
QUIET = ["train.log_every=2", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
         "train.progress=false", "train.deterministic=true"]


@pytest.fixture(scope="module")
def docker_env() -> Iterator[dict]:
    """A private dockerd for this module; the environment that reaches it."""
    if os.geteuid() != 0:
        pytest.skip("the private dockerd needs root (launch/dockerd-private.sh)")
    # Debian's engine and debootstrap (for the base image), installed where missing, as the Slurm tests install theirs
    need = subprocess.run(["bash", str(REPO / "launch" / "netns-hosts.sh"), "need", "-", "/usr/sbin/dockerd:docker.io",
                           "/usr/sbin/debootstrap:debootstrap"], capture_output=True, text=True, timeout=900)
    if need.returncode != 0:
        pytest.skip(f"Docker's engine is missing and cannot be installed here: {need.stderr.strip()[-500:]}")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("no dockerd or docker client on PATH: apt-get install -y docker.io")
    env = {**os.environ, "GLOW_DIST_DOCKER_ROOT": str(DOCKER_ROOT)}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.skip(f"no Docker engine can start here: {started.stderr.strip()[-1500:]}")
    pid = int((DOCKER_ROOT / "dockerd.pid").read_text())
    try:
        yield {**env, "DOCKER_HOST": f"unix://{DOCKER_ROOT / 'dockerd.sock'}"}
    finally:
        stopped = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr  # it names what is still mounted
        assert f"stopped (pid {pid})" in stopped.stdout and not Path(f"/proc/{pid}").exists()
        mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4].startswith(f"{DOCKER_ROOT}/")]
        assert mounted == []


@pytest.fixture(scope="module")
def cpu_image(docker_env: dict) -> dict:
    """`make docker-build` of the CPU flavour: wheelhouse/cpu and the debootstrap base are made first if missing."""
    # The build stage is tagged too, so that pruning the images older builds left (GBs each) keeps its cache.
    for args in (["IMAGE=glow-dist:cpu-test"], ["IMAGE=glow-dist:cpu-test-build", "DOCKER_TARGET=build"]):
        out = subprocess.run(["make", "--no-print-directory", "docker-build", "GPUS=0", *args], cwd=REPO,
                             env=env_with_venv(docker_env), capture_output=True, text=True, timeout=2400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    docker(docker_env, "image", "prune", "--force")
    return docker_env


def docker_train(env: dict, tmp_path: Path, data: Path, run: str, *train_args: str, container: str | None = None,
                 run_args: str = "") -> list[str]:
    """The `make docker-train` command line for the CPU image, with the run's own directory and MLflow store."""
    return ["make", "--no-print-directory", "docker-train", "GPUS=0", "IMAGE=glow-dist:cpu-test", f"DATA={data}",
            f"RUN_DIR={tmp_path / run}", f"MLFLOW_DIR={tmp_path / 'mlflow'}",
            f"CONTAINER={container or f'glow-dist-{tmp_path.name}'}", f"DOCKER_RUN_ARGS={run_args}",
            "TRAIN_ARGS=" + " ".join(train_args)]


def make(cmd: list[str], env: dict, timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env_with_venv(env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out.stdout + out.stderr


def final_test_bpd(output: str) -> float:
    """`glow-dist evaluate`'s line (make train and make docker-train both end with it)."""
    (line,) = [x for x in output.splitlines() if x.startswith("test bits/dim: ")]
    return float(line.split()[2])


def train_metrics(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("bits_per_dim/train") if metrics.exists() else 0


def docker(env: dict, *args: str) -> None:
    out = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def mlflow_run(tmp_path: Path, run_id: str):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").get_run(run_id)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_docker_train_matches_make_train_outside(cpu_image, tmp_path, digits_shards):
    """The digits, 2 Gloo ranks, seed 0: in the container and with `make train` on the host, the same weights
    (same torch, Horovod and DALI builds on the same CPU) and so the same final test bits/dim."""
    args = [*QUIET, "train.steps=30"]
    inside = make(docker_train(cpu_image, tmp_path, digits_shards, "inside", *args), cpu_image)
    outside = make(["make", "--no-print-directory", "train", f"DATA={digits_shards}", f"RUN_DIR={tmp_path / 'outside'}",
                    "TRAIN_ARGS=" + " ".join([*args, f"tracking.local_dir={tmp_path / 'mlflow'}"])], cpu_image)
    assert "world size 2" in inside and "world size 2" in outside
    ckpt_in, ckpt_out = (load_checkpoint(list_checkpoints(tmp_path / d)[-1]) for d in ("inside", "outside"))
    assert ckpt_in["position"]["step"] == ckpt_out["position"]["step"] == 30
    assert_same_weights(ckpt_in["model"], ckpt_out["model"])
    assert final_test_bpd(inside) == final_test_bpd(outside) < 4.0  # below the 4-bit uniform bound: it learned
    # Logged to the store and experiment `make train` uses (here the test's store), and finished.
    run = mlflow_run(tmp_path, ckpt_in["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert client.get_experiment(run.info.experiment_id).name == "glow-dist-digits"
    assert run.info.experiment_id == mlflow_run(tmp_path, ckpt_out["mlflow_run_id"]).info.experiment_id


def test_docker_stop_then_make_docker_train_resumes_exactly(cpu_image, tmp_path, digits_shards):
    """`docker stop` (SIGTERM to the launcher, PID 1): a verified checkpoint and a KILLED MLflow run with its stop
    tags; the next `make docker-train` resumes in a fresh container, in the same MLflow run, and ends with the
    weights of a run that never stopped."""
    container = f"glow-dist-{tmp_path.name}"
    stopped_cmd = docker_train(cpu_image, tmp_path, digits_shards, "stopped", *QUIET, "train.steps=100000",
                               "train.stop_exit_code=75")
    job = subprocess.Popen(stopped_cmd, cwd=REPO, env=env_with_venv(cpu_image), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: train_metrics(tmp_path / "stopped") >= 2, 300, "the first metrics in the container")
        docker(cpu_image, "stop", "--time", "120", container)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0 and "Error 75" in output, output[-3000:]  # rank 0's stop_exit_code, through docker
    (path,) = list_checkpoints(tmp_path / "stopped")  # the stop's, and only it
    verify_checkpoint(path)
    state = load_checkpoint(path)
    step = state["position"]["step"]
    assert f"stopped by SIGTERM at step {step}" in output, output[-3000:]
    run = mlflow_run(tmp_path, state["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["stop.reason"] == "SIGTERM"
    assert run.data.tags["stop.step"] == str(step)

    resumed = make(docker_train(cpu_image, tmp_path, digits_shards, "stopped", *QUIET, f"train.steps={step + 4}"),
                   cpu_image)
    assert f"resumed from /runs/checkpoints/ckpt-{step:08d}.pt" in resumed, resumed[-3000:]
    final = load_checkpoint(list_checkpoints(tmp_path / "stopped")[-1])
    assert final["position"]["step"] == step + 4 and final["mlflow_run_id"] == state["mlflow_run_id"]
    assert mlflow_run(tmp_path, state["mlflow_run_id"]).info.status == "FINISHED"

    make(docker_train(cpu_image, tmp_path, digits_shards, "straight", *QUIET, f"train.steps={step + 4}"), cpu_image)
    straight = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    assert straight["position"] == final["position"]
    assert_same_weights(straight["model"], final["model"])
    assert_same_weights(straight["ema"], final["ema"])


def test_docker_kill_during_the_stop_checkpoint_resumes_the_previous_one(cpu_image, tmp_path, digits_shards):
    """SIGTERM, then `docker kill` (SIGKILL) while the stop checkpoint is being written (held 600 s): the half-written
    file is never a checkpoint, and the next `make docker-train` resumes from the one before."""
    container = f"glow-dist-{tmp_path.name}"
    make(docker_train(cpu_image, tmp_path, digits_shards, "run", *QUIET, "train.steps=4"), cpu_image)
    run_dir = tmp_path / "run"
    (previous,) = list_checkpoints(run_dir)
    logged = train_metrics(run_dir)
    job = subprocess.Popen(docker_train(cpu_image, tmp_path, digits_shards, "run", *QUIET, "train.steps=100000",
                                        run_args="-e GLOW_DIST_INJECT_SLOW_CHECKPOINT=600"),
                           cwd=REPO, env=env_with_venv(cpu_image), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(lambda: train_metrics(run_dir) >= logged + 2, 300, "the resumed run's metrics")
        docker(cpu_image, "kill", "--signal", "TERM", container)
        wait_for(lambda: any(p.name.startswith(".tmp-ckpt-") for p in (run_dir / "checkpoints").iterdir()), 120,
                 "the stop checkpoint's temporary file")
        docker(cpu_image, "kill", container)  # SIGKILL: the grace period is over
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0 and "Error 137" in output, output[-3000:]
    assert list_checkpoints(run_dir) == [previous]
    verify_checkpoint(previous)
    resumed = make(docker_train(cpu_image, tmp_path, digits_shards, "run", *QUIET, "train.steps=6"), cpu_image)
    assert "resumed from /runs/checkpoints/ckpt-00000004.pt" in resumed, resumed[-3000:]
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["position"]["step"] == 6


def build_cpu(env: dict, context: Path, *args: str) -> subprocess.CompletedProcess:
    """docker build of the CPU flavour as `make docker-build` runs it (so the apt layer comes from the cache)."""
    return subprocess.run(["docker", "build", "--network", "host", "-f", str(REPO / "docker" / "Dockerfile"),
                           "--build-arg", "BASE_IMAGE=debian-local:bookworm", "--build-arg",
                           "WHEELHOUSE=wheelhouse/cpu", *args, "-t", "glow-dist:refused", str(context)],
                          env=env, capture_output=True, text=True, timeout=900)


def copy_context(context: Path, leave_out: str | None = None) -> Path:
    """The build context of the CPU image in `context` (wheels hard-linked: no copy of a GB), less the wheels whose
    names start with `leave_out`."""
    for name in ("docker", "launch", "glow_dist", "configs", "pyproject.toml", "README.md", ".dockerignore"):
        src = REPO / name
        shutil.copytree(src, context / name) if src.is_dir() else shutil.copy(src, context / name)
    house = context / "wheelhouse" / "cpu"
    house.mkdir(parents=True)
    for wheel in (REPO / "wheelhouse" / "cpu").iterdir():
        if leave_out is None or not wheel.name.startswith(leave_out):
            os.link(wheel, house / wheel.name)
    return context


def test_a_readme_edit_rebuilds_no_dependency_layer(cpu_image, tmp_path):
    """The venv's layers (GBs; 7 GB in the GPU image) come from the cache after an edit of README.md: the dependency
    step once copied README.md (pyproject's readme), so any edit of it reinstalled every wheel."""
    context = copy_context(tmp_path / "context")
    (context / "README.md").write_text((REPO / "README.md").read_text() + "\nAn edit.\n")
    out = build_cpu(cpu_image, context, "--build-arg", "FLAVOUR=cpu", "--target", "build")
    assert out.returncode == 0, out.stdout[-3000:]
    steps = re.split(r"\nStep \d+/\d+ : ", out.stdout)  # the legacy builder: "Step N/M : INSTRUCTION", then its lines
    installs = [step for step in steps if "pip install" in step.split("\n")[0]]   # torch and Horovod, then the rest
    assert any(step.startswith("RUN mkdir glow_dist") for step in installs), out.stdout[-3000:]
    for step in installs:
        assert "\n ---> Using cache\n" in step, step[-3000:]


def test_the_build_names_a_missing_wheel_and_a_wheelhouse_of_the_wrong_flavour(cpu_image, tmp_path):
    wrong = build_cpu(cpu_image, REPO, "--build-arg", "FLAVOUR=gpu")  # a CPU torch cannot make the GPU image
    assert wrong.returncode != 0
    assert "docker: wheelhouse/cpu holds torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl, a cpu build; " \
           "FLAVOUR=gpu needs a wheelhouse of its own" in wrong.stdout, wrong.stdout[-3000:]
    # The same context with the Horovod wheel missing from the wheelhouse.
    context = copy_context(tmp_path / "context", leave_out="horovod-")
    missing = build_cpu(cpu_image, context, "--build-arg", "FLAVOUR=cpu")
    assert missing.returncode != 0
    # (the legacy builder streams a step's stdout and stderr alike to the client's stdout)
    assert "No matching distribution found for horovod==0.28.1" in missing.stdout, missing.stdout[-3000:]
    assert "docker: a wheel is missing from wheelhouse/cpu" in missing.stdout



# The GPU image without a registry (issue 34): the GPU flavour on the debootstrap base from the cu13 wheelhouse,
# offline, checked inside on this machine's CPU. Long (a cold build installs 7 GB of wheels; docs/cluster/docker.md),
# so only when asked for; `make docker-build` makes wheelhouse/cu13 first if it is missing (several GB from PyPI).
GPU_WHEELHOUSE = "wheelhouse/cu13"
needs_gpu_image = pytest.mark.skipif(
    os.environ.get("GLOW_DIST_TEST_GPU_IMAGE") != "1",
    reason="the GPU image's build from wheelhouse/cu13 is long (docs/cluster/docker.md): "
           "GLOW_DIST_TEST_GPU_IMAGE=1 runs it")
# A CPU pipeline of DALI's CUDA 13 build: decode a PNG and flip it, against numpy.
DALI_CPU_PIPELINE = """
import importlib.metadata as md, io
import numpy as np
from PIL import Image
from nvidia.dali import fn, pipeline_def
pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
png = io.BytesIO()
Image.fromarray(pixels).save(png, format="PNG")
blob = np.frombuffer(png.getvalue(), dtype=np.uint8)
@pipeline_def(batch_size=2, num_threads=1, device_id=None)
def flipped():
    return fn.flip(fn.decoders.image(fn.external_source(source=lambda: [blob, blob]), device="cpu"), horizontal=1)
pipe = flipped()
pipe.build()
(out,) = pipe.run()
assert all(np.array_equal(out.at(i), pixels[:, ::-1]) for i in range(2))
print("dali", md.version("nvidia-dali-cuda130"), "cpu pipeline ok")
"""
# What Triton does when a kernel first runs under torch.compile on a GPU: build a C extension with the system compiler
# against Python's headers (triton.runtime.build), here for a module that only imports.
TRITON_BUILD = """
import importlib.util, os, tempfile
from triton.runtime.build import _build
d = tempfile.mkdtemp()
src = os.path.join(d, "probe.c")
with open(src, "w") as f:
    f.write('''#include <Python.h>
static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }
''')
so = _build("probe", src, d, [], [], [], [])
spec = importlib.util.spec_from_file_location("probe", so)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("triton builds its launchers")
"""


@pytest.fixture(scope="module")
def gpu_image(docker_env: dict) -> dict:
    """`make docker-build FLAVOUR=gpu GPU_WHEELHOUSE=wheelhouse/cu13` on debian-local:bookworm (made if missing)."""
    for args in (["IMAGE=glow-dist:gpu-test"], ["IMAGE=glow-dist:gpu-test-build", "DOCKER_TARGET=build"]):
        out = subprocess.run(["make", "--no-print-directory", "docker-build", "FLAVOUR=gpu",
                              f"GPU_WHEELHOUSE={GPU_WHEELHOUSE}", *args], cwd=REPO, env=env_with_venv(docker_env),
                             capture_output=True, text=True, timeout=5400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return docker_env


def in_gpu_image(env: dict, *cmd: str) -> str:
    """A command in a fresh container of the GPU image, with no network (everything it needs is in the image)."""
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", "glow-dist:gpu-test", *cmd], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd} in the GPU image:\n{(out.stdout + out.stderr)[-4000:]}"
    return out.stdout + out.stderr


@needs_gpu_image
def test_gpu_image_offline_on_debian_has_the_cuda13_stack(gpu_image):
    torch_line = in_gpu_image(gpu_image, "python", "-c", "import torch; print('torch', torch.__version__, "
                              "torch.version.cuda, torch.cuda.is_available())")
    _, version, cuda, available = torch_line.split()[-4:]
    assert cuda.startswith("13.") and available == "False", torch_line
    build = in_gpu_image(gpu_image, "horovodrun", "--check-build")
    assert "[X] NCCL" in build and "[X] Gloo" in build and "[X] PyTorch" in build, build
    assert "cpu pipeline ok" in in_gpu_image(gpu_image, "python", "-c", DALI_CPU_PIPELINE)
    assert "triton builds its launchers" in in_gpu_image(gpu_image, "python", "-c", TRITON_BUILD)
    doctor = in_gpu_image(gpu_image, "glow-dist", "doctor")
    assert f"no CUDA device: this torch is a CUDA {cuda} build but there is no NVIDIA driver" in doctor, doctor
    # Nothing of the build in the image: no toolkit or nvcc wheels (Horovod came built), no static libraries, no
    # wheelhouse, no pip cache, no cmake, DALI's extension modules only for the image's own Python.
    leftovers = in_gpu_image(gpu_image, "bash", "-c", "find / -xdev \\( -name nvcc -o -path /tmp/wheelhouse -o "
                             "-path /root/.cache/pip \\) -print; find /opt/venv -name '*.a'; pip list --format "
                             "freeze | grep -iE '^(cmake|nvidia-cuda-nvcc|nvidia-cuda-crt|nvidia-nvvm)=' || true; "
                             "ls /opt/venv/lib/python3.11/site-packages/nvidia/dali | grep cpython | "
                             "grep -v cpython-311 || true")
    assert leftovers.strip() == "", leftovers


@needs_gpu_image
def test_gpu_image_trains_the_digits_on_the_cpu(gpu_image, tmp_path, digits_shards):
    """`make docker-train` of the GPU image as a GPU cluster runs it, minus `--gpus all` (DOCKER_GPU_ARGS=): 2 Gloo
    ranks on the CPU, the final checkpoint, the evaluation (a GPU image's first run on a GPU machine is the same
    command with --gpus all: docs/cluster/docker.md)."""
    out = make(["make", "--no-print-directory", "docker-train", "FLAVOUR=gpu", "GPUS=2", "DOCKER_GPU_ARGS=",
                f"GPU_WHEELHOUSE={GPU_WHEELHOUSE}", "IMAGE=glow-dist:gpu-test", f"DATA={digits_shards}",
                f"RUN_DIR={tmp_path / 'run'}", f"MLFLOW_DIR={tmp_path / 'mlflow'}",
                f"CONTAINER=glow-dist-{tmp_path.name}", "TRAIN_ARGS=" + " ".join([*QUIET, "train.steps=30"])],
               gpu_image, timeout=1200)
    assert "world size 2" in out and "decoding on the CPU" in out, out[-3000:]
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["position"]["step"] == 30
    assert final_test_bpd(out) < 4.0, out[-3000:]  # below the 4-bit uniform bound: it learned
