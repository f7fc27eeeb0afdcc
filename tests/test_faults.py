"""Faults between hosts, with real processes on two hosts (network namespaces with sshd, as tests/test_multihost.py):
`glow-dist-horovodrun -np 2 -H hostA:1,hostB:1` trains, and in the middle of it

- hostB's link goes down (packets dropped, no RST: a dead switch port),
- rank 1 on hostB is frozen with SIGSTOP (a hung process),
- rank 1's step stalls before its collectives (GLOW_DIST_INJECT_STALL: a hung data loader or GPU kernel; the
  others wait in the all-reduce, where only the step watchdog, dist.hang_timeout, ends it).

Each must end within a bound set by the timeouts (Gloo's, lowered to GLOO_TIMEOUT_S; the watchdog's), with the one
line that names rank 1 on hostB and the newest verified checkpoint printed exactly once, exit status 69, the MLflow
run FAILED with its failure.* tags, no process of the job left on either host, and the same command resuming from
that checkpoint once the fault is gone.

Needs root and network namespaces; elsewhere it skips and says why.
"""
# ruff: noqa: F811
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from test_multihost import SETUP, two_hosts  # noqa: F401 - the fixture, used as an argument below (F811)

from glow_dist.checkpoint import list_checkpoints
from glow_dist.distributed import guard
from glow_dist.failures import EX_PEER_LOST

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GLOO_TIMEOUT_S = 20        # HOROVOD_GLOO_TIMEOUT_SECONDS (default 30); its rendezvous uses it too, so not lower
HANG_TIMEOUT_S = 15        # dist.hang_timeout for the stall
LINE = "glow-dist train: peer error: "

pytestmark = pytest.mark.slow


def command(hosts_dir: Path, tmp_path: Path, shards: Path, *extra: str) -> list[str]:
    train = [sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", f"data.root={shards}",
             f"train.run_dir={tmp_path / 'run'}", f"tracking.local_dir={tmp_path / 'mlflow'}", "train.steps=30",
             "train.log_every=1", "train.eval_every=1000", "train.sample_every=1000", "train.checkpoint_every=2",
             "train.max_eval_batches=2", "train.progress=false", "train.threads=1", *extra]
    launcher = [str(BIN / "glow-dist-horovodrun"), "-np", "2", "-H", "hostA:1,hostB:1", "--gloo",
                "--network-interfaces", "gd0", "-p", "2222", "--ssh-identity-file", str(hosts_dir / "id_ed25519"),
                "--start-timeout", "60", "--disable-cache", *train]
    return ["bash", str(SETUP), "run", str(hosts_dir), *launcher]


class Job:
    """The two-host job, its combined output in a file, and a tag in the environment of every process it starts on
    either host (horovodrun exports the environment to hostB), to find what is left of it."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        self.log = log
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HOROVOD_GLOO_TIMEOUT_SECONDS":
               str(GLOO_TIMEOUT_S), "GLOW_DIST_FAULTS_TAG": self.tag, **(env or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """Every process, on either host (the namespaces share one process table), that this job started."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("GLOW_DIST_FAULTS_TAG") == self.tag:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def rank(self, rank: int) -> psutil.Process:
        for proc in self.processes():
            try:
                env = proc.environ()
                if env.get("HOROVOD_RANK") == str(rank) and "glow_dist" in " ".join(proc.cmdline()) \
                        and proc.parent() is not None and proc.parent().environ().get("HOROVOD_RANK") is None:
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        raise AssertionError(f"no rank {rank} process:\n{self.output()[-3000:]}")

    def wait_training(self, run_dir: Path, timeout: float = 240) -> None:
        """Until a checkpoint is on disk and the job has logged a step after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the job ended early:\n{self.output()[-4000:]}"
            done = list_checkpoints(run_dir)
            if done and re.search(r"step (\d+):", self.output()):
                steps = [int(s) for s in re.findall(r"step (\d+): bits_per_dim/train", self.output())]
                if steps and max(steps) > int(done[-1].stem.split("-")[-1]):
                    return
            time.sleep(0.2)
        raise AssertionError(f"no checkpoint and step after it within {timeout} s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_one_line_and_failed(job: Job, tmp_path: Path, elapsed: float, bound: float, says: str) -> Path:
    """The job's end: status, the one line (once), MLflow, nothing left; returns the checkpoint the line names."""
    out = job.output()
    assert job.proc.returncode == EX_PEER_LOST, f"exit {job.proc.returncode}:\n{out[-5000:]}"
    assert elapsed < bound, f"took {elapsed:.0f} s (bound {bound} s):\n{out[-5000:]}"
    lines = [line for line in out.splitlines() if LINE in line]
    assert len(lines) == 1, "\n".join(lines) or out[-5000:]
    line = lines[0]
    assert "rank 1 on hostB" in line and says in line, line
    assert "run the same command again to resume" in line and "Traceback" not in out, out[-5000:]
    found = re.search(r"newest verified checkpoint (\S+) \(step (\d+)\)", line)
    assert found, line
    checkpoint = Path(found.group(1))
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").search_runs(["1"])[0]
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["failure.reason"] == "peer-lost" and tags["failure.checkpoint"] == str(checkpoint), tags
    assert int(tags["failure.step"]) >= int(found.group(2)) and "rank 1 on hostB" in tags["failure.message"]
    deadline = time.monotonic() + guard.GRACE_S + 20   # the guard on hostB: SIGTERM, then SIGKILL GRACE_S later
    while job.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [f"{p.pid} {' '.join(p.cmdline())[:200]} ({p.status()})" for p in job.processes()]
    assert not left, "left running:\n" + "\n".join(left)
    print(f"{says}: ended in {elapsed:.1f} s with exit {EX_PEER_LOST}; {line}")
    return checkpoint


def assert_resumes(hosts_dir: Path, tmp_path: Path, shards: Path, checkpoint: Path) -> None:
    rerun = Job(command(hosts_dir, tmp_path, shards), tmp_path / "rerun.log")
    try:
        rerun.proc.wait(timeout=300)
    finally:
        rerun.kill()
    out = rerun.output()
    assert rerun.proc.returncode == 0, out[-5000:]
    assert f"resumed from {checkpoint}" in out, out[-5000:]


@pytest.fixture
def job_cleanup():
    """Jobs a test started, killed whatever happened (a failed test must not leave ranks behind)."""
    jobs: list[Job] = []
    yield jobs
    for job in jobs:
        job.kill()


@pytest.mark.hosts
def test_a_partitioned_host_ends_the_job_with_one_line_and_the_rerun_resumes(two_hosts, tmp_path, digits_shards,
                                                                              job_cleanup):
    job = Job(command(two_hosts, tmp_path, digits_shards), tmp_path / "job.log",
              env={"GLOW_DIST_INJECT_SLOW_STEP": "0.5"})
    job_cleanup.append(job)
    job.wait_training(tmp_path / "run")
    host_b = (two_hosts / "namespaces").read_text().split()[1]
    subprocess.run(["ip", "-n", host_b, "link", "set", "gd0", "down"], check=True)
    t0 = time.monotonic()
    job.proc.wait(timeout=GLOO_TIMEOUT_S + 120)
    elapsed = time.monotonic() - t0
    checkpoint = assert_one_line_and_failed(job, tmp_path, elapsed, GLOO_TIMEOUT_S + 60, "went silent")
    subprocess.run(["ip", "-n", host_b, "link", "set", "gd0", "up"], check=True)
    assert_resumes(two_hosts, tmp_path, digits_shards, checkpoint)


@pytest.mark.hosts
def test_a_frozen_rank_ends_the_job_and_is_not_left_behind_on_its_host(two_hosts, tmp_path, digits_shards,
                                                                       job_cleanup):
    job = Job(command(two_hosts, tmp_path, digits_shards), tmp_path / "job.log",
              env={"GLOW_DIST_INJECT_SLOW_STEP": "0.5"})
    job_cleanup.append(job)
    job.wait_training(tmp_path / "run")
    frozen = job.rank(1)
    frozen.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    job.proc.wait(timeout=GLOO_TIMEOUT_S + 120)
    elapsed = time.monotonic() - t0
    checkpoint = assert_one_line_and_failed(job, tmp_path, elapsed, GLOO_TIMEOUT_S + 60, "went silent")
    assert not psutil.pid_exists(frozen.pid) or frozen.status() == psutil.STATUS_ZOMBIE
    assert_resumes(two_hosts, tmp_path, digits_shards, checkpoint)


@pytest.mark.hosts
def test_a_stalled_step_on_one_host_is_ended_by_the_watchdog(two_hosts, tmp_path, digits_shards, job_cleanup):
    # Rank 1 holds step 6 for an hour before its collectives; rank 0 waits in the all-reduce, which Gloo does not
    # time out (its background loop still negotiates): a hang only the watchdog ends.
    job = Job(command(two_hosts, tmp_path, digits_shards, f"dist.hang_timeout={HANG_TIMEOUT_S}"),
              tmp_path / "job.log", env={"GLOW_DIST_INJECT_STALL": "6:1"})
    job_cleanup.append(job)
    deadline = time.monotonic() + 300
    while "<stderr>:step 6: " not in job.output():   # rank 0 logs step 6; rank 1 then stalls in the next one
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output()[-4000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    job.proc.wait(timeout=HANG_TIMEOUT_S + 180)
    elapsed = time.monotonic() - t0
    out = job.output()
    assert "[watchdog] rank 0 on hostA: no step finished" in out and "Current thread" in out, out[-4000:]
    assert "[watchdog] rank 1 on hostB" in out, out[-4000:]   # hostB's stacks reach the log too
    checkpoint = assert_one_line_and_failed(job, tmp_path, elapsed, HANG_TIMEOUT_S + 60,
                                            "is alive but did not finish step 7")
    assert_resumes(two_hosts, tmp_path, digits_shards, checkpoint)


# --- On one host (no root needed): a killed rank, and the guard on its own. ---------------------------------------

def test_a_killed_rank_ends_the_job_with_one_line_from_rank_0(tmp_path, digits_shards, job_cleanup):
    """SIGKILL of rank 1 (an OOM kill, a crash): horovodrun sees it first and tears the job down, yet rank 0 names
    it, closes the run FAILED and the launcher exits 69, not the killed rank's 137."""
    train = [sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", f"data.root={digits_shards}",
             f"train.run_dir={tmp_path / 'run'}", f"tracking.local_dir={tmp_path / 'mlflow'}", "train.steps=60",
             "train.log_every=1", "train.eval_every=1000", "train.sample_every=1000", "train.checkpoint_every=2",
             "train.max_eval_batches=2", "train.progress=false", "train.threads=1"]
    job = Job([str(BIN / "glow-dist-horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", *train],
              tmp_path / "job.log", env={"GLOW_DIST_INJECT_SLOW_STEP": "0.5"})
    job_cleanup.append(job)
    job.wait_training(tmp_path / "run")
    job.rank(1).kill()
    t0 = time.monotonic()
    job.proc.wait(timeout=120)
    out = job.output()
    assert job.proc.returncode == EX_PEER_LOST, f"exit {job.proc.returncode}:\n{out[-4000:]}"
    lines = [line for line in out.splitlines() if LINE in line]
    assert len(lines) == 1 and f"rank 1 on {socket.gethostname()} went silent" in lines[0], out[-4000:]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").search_runs(["1"])[0]
    assert run.info.status == "FAILED" and run.data.tags["failure.reason"] == "peer-lost"
    assert not job.processes()
    print(f"killed rank: ended in {time.monotonic() - t0:.1f} s; {lines[0]}")


def test_the_guard_ends_a_stopped_rank_once_nobody_reads_its_output():
    """What ends a frozen rank on hostB: its guard, once the ssh session (here: the pipe's reader) is gone."""
    code = ("from glow_dist.distributed import guard; import time; guard.start(); print('up', flush=True); "
            "time.sleep(600)")
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert rank.stdout.readline() == b"up\n"
        rank.send_signal(signal.SIGSTOP)
        time.sleep(3)
        assert rank.poll() is None   # the reader is still there: the guard leaves the rank alone
        rank.stdout.close()          # the session ends: SIGTERM, which a stopped rank cannot act on, then SIGKILL
        assert rank.wait(timeout=guard.GRACE_S + 10) == -signal.SIGKILL
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 10   # and the guard itself is gone
    while any("glow_dist.distributed.guard" in " ".join(p.info["cmdline"] or []) and str(rank.pid) in
              (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "the guard outlived its rank"
        time.sleep(0.2)
