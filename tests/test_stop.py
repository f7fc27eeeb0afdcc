"""Stopping real jobs the ways schedulers stop them: a signal to the process group (`timeout`, Ctrl-C), to every
process of the job (Slurm), to the launcher alone (`docker stop`, a pod's PID 1), Slurm's early-warning USR1 through
the sbatch script, and SIGKILL in the middle of the stop checkpoint. Each asserts the verified checkpoint, the exit
status, the MLflow run's status and stop tags on a real server, and that the same command resumes from the step."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, REPO, env_with_venv, train_cmd, wait_for
from mlflow.tracking import MlflowClient

from glow_dist.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.drills]   # make test-drills

# The debug model, nothing periodic but metrics: the only checkpoint is the stop's.
QUIET = ["train.steps=100000", "train.log_every=2", "train.eval_every=0", "train.sample_every=0",
         "train.checkpoint_every=0", "train.progress=false", "train.threads=1", "train.max_eval_batches=2",
         "tracking.log_checkpoints=false"]


def overrides(tmp_path: Path, shards: Path, uri: str, backend: str, *extra: str) -> list[str]:
    return [*QUIET, f"data.root={shards}", f"data.backend={backend}", "data.num_workers=2",
            f"train.run_dir={tmp_path / 'run'}", f"tracking.uri={uri}", f"tracking.experiment=stop-{tmp_path.name}",
            *extra]


def launcher_cmd(np: int, *args: str) -> list[str]:
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    return [str(BIN / "glow-dist-horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable,
            *args]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # A new session, as `setsid` or a batch scheduler gives a job: its process group is the job.
    return subprocess.Popen(cmd, cwd=REPO, env=env_with_venv(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("bits_per_dim/train") >= 2


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (ranks, horovodrun's middlemen and shells, loader workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(job: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return output


def stopped_checkpoint(run_dir: Path) -> tuple[int, dict]:
    (path,) = list_checkpoints(run_dir)  # the stop's, and only it
    verify_checkpoint(path)
    state = load_checkpoint(path)
    return state["position"]["step"], state


def mlflow_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def assert_stopped(output: str, run_dir: Path, uri: str, experiment: str, reason: str) -> int:
    step, _ = stopped_checkpoint(run_dir)
    assert 0 < step < 100000
    assert f"stopped by {reason} at step {step}" in output, output[-3000:]
    run = mlflow_run(uri, experiment)
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["stop.reason"] == reason and run.data.tags["stop.step"] == str(step)
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    return step


def assert_resumes(cmd: list[str], step: int, run_dir: Path, uri: str, experiment: str) -> None:
    """The same command, with train.steps two past the stop, resumes there and finishes the same MLflow run."""
    out = subprocess.run([*cmd, f"train.steps={step + 2}", "train.stop_exit_code=0"], cwd=REPO, env=env_with_venv(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt-{step:08d}.pt'}" in out.stdout + out.stderr
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert final["position"]["step"] == step + 2
    run = mlflow_run(uri, experiment)
    assert run.info.status == "FINISHED" and final["mlflow_run_id"] == run.info.run_id


# Resuming is checked once per launcher (a whole second run each), on the case of the issue.
@pytest.mark.parametrize("backend, sig, target, resume", [
    ("webdataset", signal.SIGTERM, "group", True),    # `timeout`, or Slurm: the crash
    ("webdataset", signal.SIGTERM, "every", False),   # each process on its own, loader workers first
    ("webdataset", signal.SIGINT, "group", False),    # Ctrl-C
    ("dali", signal.SIGUSR1, "group", False),         # Slurm's early warning
])
def test_one_process_stops_with_a_checkpoint(tmp_path, digits_shards, mlflow_server, backend, sig, target, resume):
    pytest.importorskip("nvidia.dali") if backend == "dali" else None
    args = overrides(tmp_path, digits_shards, mlflow_server, backend)
    cmd = [sys.executable, *train_cmd(*args)]
    job = start([*cmd, "train.stop_exit_code=75"])
    run_dir = tmp_path / "run"
    try:
        wait_for(lambda: training(run_dir), 240, "the first metrics")
        if target == "group":
            os.killpg(job.pid, sig)
        else:
            workers = descendants(job.pid)
            assert len(workers) >= 2 or backend == "dali", "no loader workers to signal: nothing was tested"
            for pid in [*workers, job.pid]:
                os.kill(pid, sig)
    finally:
        output = finish(job)
    assert job.returncode == 75, output[-3000:]
    step = assert_stopped(output, run_dir, mlflow_server, f"stop-{tmp_path.name}", signal.Signals(sig).name)
    if resume:
        assert_resumes(cmd, step, run_dir, mlflow_server, f"stop-{tmp_path.name}")


@pytest.mark.parametrize("backend, target, sig, resume", [
    ("webdataset", "group", signal.SIGTERM, True),      # `timeout`, a terminal's process group
    ("dali", "every", signal.SIGTERM, False),           # Slurm: launcher, middlemen, shells, ranks, workers at once
    ("webdataset", "launcher", signal.SIGTERM, False),  # `docker stop`, Kubernetes: PID 1 alone
])
def test_horovodrun_stop_outlasts_its_5_second_kill(tmp_path, digits_shards, mlflow_server, backend, target, sig,
                                                    resume):
    """The stop checkpoint is held 7 s (a multi-GB write): horovodrun itself would SIGKILL rank 0 after 5 s."""
    args = overrides(tmp_path, digits_shards, mlflow_server, backend)
    job = start(launcher_cmd(2, *train_cmd(*args, "train.stop_exit_code=75")),
                env={"GLOW_DIST_INJECT_SLOW_CHECKPOINT": "7"})
    run_dir = tmp_path / "run"
    try:
        wait_for(lambda: training(run_dir), 240, "the first metrics")
        if target == "group":
            os.killpg(job.pid, sig)
        elif target == "launcher":
            os.kill(job.pid, sig)
        else:
            processes = descendants(job.pid)
            assert len(processes) >= 6, "not the whole job: middlemen, shells and ranks were expected"
            for pid in [job.pid, *processes]:
                os.kill(pid, sig)
    finally:
        output = finish(job)
    assert job.returncode == 75, output[-3000:]  # rank 0's train.stop_exit_code, through the launcher
    step = assert_stopped(output, run_dir, mlflow_server, f"stop-{tmp_path.name}", signal.Signals(sig).name)
    assert "exit with status code" not in output.replace("Process 0 exit with status code 75", ""), output[-3000:]
    if resume:
        assert_resumes(launcher_cmd(2, *train_cmd(*args)), step, run_dir, mlflow_server, f"stop-{tmp_path.name}")


def test_slurm_early_warning_stops_and_requeues(tmp_path, digits_shards, mlflow_server):
    """The sbatch script as Slurm runs it on the first node, USR1 to the batch shell alone (--signal=B:USR1)."""
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    fake = tmp_path / "bin"
    fake.mkdir()
    requeued = tmp_path / "requeued"
    # `scontrol show hostnames` gives this machine; `scontrol requeue JOB` is recorded.
    (fake / "scontrol").write_text(f'#!/bin/sh\ncase "$1" in show) echo localhost;; requeue) echo "$2" >{requeued};; '
                                   "esac\n")
    (fake / "scontrol").chmod(0o755)
    # The ssh route (horovodrun on this machine); the srun route needs a real Slurm, tests/test_slurm.py.
    env = {"LAUNCHER": "ssh", "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost",
           "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "2", "HOSTFILE": str(tmp_path / "hostfile"), "NIC": "lo",
           "CONFIG": "configs/debug.yaml", "DATA": str(digits_shards), "RUN_DIR": str(tmp_path / "run"),
           "MLFLOW_TRACKING_URI": mlflow_server, "BIN": str(BIN)}
    extra = [x for x in overrides(tmp_path, digits_shards, mlflow_server, "webdataset")
             if not x.startswith(("data.root", "train.run_dir", "tracking.uri"))]
    job = start(["bash", "launch/slurm/celeba_hq_256.sbatch", *extra], env=env)
    run_dir = tmp_path / "run"
    try:
        wait_for(lambda: training(run_dir), 240, "the first metrics")
        os.kill(job.pid, signal.SIGUSR1)
    finally:
        output = finish(job)
    assert job.returncode == 75, output[-3000:]
    assert requeued.read_text().strip() == "4242", output[-3000:]
    assert_stopped(output, run_dir, mlflow_server, f"stop-{tmp_path.name}", "SIGUSR1")


def test_sigkill_during_the_stop_checkpoint_keeps_the_previous_one(tmp_path, digits_shards, mlflow_server):
    """A stop whose checkpoint outlasts the grace period: SIGKILL mid-write, and the previous checkpoint resumes."""
    args = overrides(tmp_path, digits_shards, mlflow_server, "webdataset")
    cmd = [sys.executable, *train_cmd(*args)]
    run_dir = tmp_path / "run"
    first = subprocess.run([*cmd, "train.steps=4"], cwd=REPO, env=env_with_venv(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    previous = list_checkpoints(run_dir)[-1]
    logged = (run_dir / "metrics.jsonl").read_text().count("bits_per_dim/train")
    job = start(cmd, env={"GLOW_DIST_INJECT_SLOW_CHECKPOINT": "600"})
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").read_text().count("bits_per_dim/train") >= logged + 2, 240,
                 "the resumed run's metrics")
        os.killpg(job.pid, signal.SIGTERM)
        wait_for(lambda: any(p.name.startswith(".tmp-ckpt-") for p in (run_dir / "checkpoints").iterdir()), 120,
                 "the stop checkpoint's temporary file")
        os.killpg(job.pid, signal.SIGKILL)  # the grace period is over
    finally:
        finish(job)
    assert list_checkpoints(run_dir) == [previous]  # the half-written one is not a checkpoint
    verify_checkpoint(previous)
    out = subprocess.run([*cmd, "train.steps=6"], cwd=REPO, env=env_with_venv(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {previous}" in out.stderr
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["position"]["step"] == 6


def test_a_stop_signal_during_start_up_reaches_the_rank_once_it_can_take_it(tmp_path):
    """Slurm's warning (or a scancel) while the ranks are still starting: the launcher passes it on as soon as the
    rank has its handler, never before (the default action would kill it), instead of losing it."""
    from glow_dist.distributed.launcher import catches

    got = tmp_path / "got"
    rank = ("import pathlib, signal, sys, time\n"
            "time.sleep(3)  # a slow start: imports, data, Horovod; USR1 now would kill this process\n"
            "seen = []\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))\n"
            "deadline = time.monotonic() + 60\n"
            "while not seen and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "pathlib.Path(sys.argv[1]).write_text(repr(seen))\n")
    job = start(launcher_cmd(1, "-c", rank, str(got)))
    try:
        wait_for(lambda: catches(job.pid, signal.SIGUSR1), 60, "the launcher's handlers")
        os.kill(job.pid, signal.SIGUSR1)
    finally:
        output = finish(job, timeout=120)
    assert job.returncode == 0, output[-3000:]
    assert got.read_text() == repr([signal.SIGUSR1.value]), output[-3000:]
    assert "which was still starting" in output, output[-3000:]
