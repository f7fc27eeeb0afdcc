"""Horovod elastic on localhost: a worker killed with SIGKILL, the job going on with one, the worker rejoining.

Two host names that both resolve to this machine (Horovod starts their workers without ssh), one slot each; the
discovery script (launch/discover_hosts.sh) reads them from a file. Horovod blacklists the host of a failed worker;
`--blacklist-cooldown-range` lets it back after a few seconds, which is how the killed worker rejoins.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from helpers import BIN, REPO, assert_identical, env_with_venv, train_cmd, wait_for
from mlflow.tracking import MlflowClient

from glow_dist.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

HOSTS = ("localhost", "127.0.0.1")
ELASTIC_CHECK = REPO / "tests" / "scripts" / "elastic_check.py"


def local_addresses() -> set[str]:
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


def elastic_cmd(outdir: Path, overrides: list[str]) -> list[str]:
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    if any(socket.gethostbyname(h) not in local_addresses() for h in HOSTS):
        pytest.skip(f"{HOSTS} do not all resolve to an address of this machine")
    return [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
            "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"),
            "--blacklist-cooldown-range", "2", "4", "--gloo",
            sys.executable, str(ELASTIC_CHECK), str(outdir), "--config", "configs/debug.yaml", "dist.elastic=true",
            *overrides]


def worker_processes(marker: str) -> dict[psutil.Process, int]:
    """{process: rank it was launched with} for the live Python workers whose command line holds `marker`. Ranks
    change at an elastic reset while the environment keeps the launch rank, so only the first one is exact."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if marker in cmd and "elastic_check" in cmd and proc.info["name"].startswith("python") \
                    and "horovodrun" not in cmd:
                found[proc] = int(proc.environ()["HOROVOD_RANK"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    return found


def records(metrics: Path) -> list[dict]:
    found = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return found


def test_elastic_without_an_elastic_launch_is_refused(tmp_path, digits_shards):
    cmd = [sys.executable, *train_cmd(f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}",
                                      "dist.elastic=true")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env_with_venv())
    assert out.returncode == 2
    assert "--host-discovery-script" in out.stderr


@pytest.mark.slow
@pytest.mark.drills
@pytest.mark.parametrize("killed", [1, 0], ids=["rank1", "rank0"])
def test_killed_worker_job_continues_then_worker_rejoins(tmp_path, digits_shards, killed):
    run_dir, outdir, log = tmp_path / "run", tmp_path / "out", tmp_path / "horovodrun.log"
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("".join(f"{h}:1\n" for h in HOSTS))
    overrides = [f"data.root={digits_shards}", f"train.run_dir={run_dir}", f"tracking.local_dir={tmp_path / 'ml'}",
                 "train.steps=1000000", "train.log_every=5", "train.eval_every=1000000", "train.sample_every=1000000",
                 "train.checkpoint_every=1000000", "train.progress=false", "train.threads=1",
                 "train.max_eval_batches=2", "dist.commit_every=5"]
    metrics = run_dir / "metrics.jsonl"

    def world_sizes() -> list[tuple[int, float]]:
        return [(r["step"], r["metrics"]["world_size"]) for r in records(metrics) if "world_size" in r["metrics"]]

    def last_train_step() -> int:
        return max([r["step"] for r in records(metrics) if "bits_per_dim/train" in r["metrics"]], default=0)

    with open(log, "w") as out:
        job = subprocess.Popen(elastic_cmd(outdir, overrides), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                               env=env_with_venv({"GLOW_DIST_HOSTS_FILE": str(hosts_file)}), start_new_session=True)
    try:
        wait_for(lambda: last_train_step() >= 20, 120, "20 steps on 2 workers", log)
        assert world_sizes() == [(0, 2.0)]
        workers = worker_processes(str(run_dir))
        assert sorted(workers.values()) == [0, 1]
        victim = next(p for p, r in workers.items() if r == killed)
        victim.send_signal(signal.SIGKILL)  # a lost worker, no warning; rank 0 also holds the reporter

        shrunk_at = wait_for(lambda: next((s for s, w in world_sizes() if w == 1.0), None), 60, "world size 1", log)
        wait_for(lambda: last_train_step() >= shrunk_at + 10, 60, "steps on the one remaining worker", log)
        grown_at = wait_for(lambda: next((s for s, w in world_sizes() if w == 2.0 and s >= shrunk_at), None), 60,
                            "the killed host's worker to rejoin (world size 2)", log)
        wait_for(lambda: last_train_step() >= grown_at + 10, 60, "steps after the rejoin", log)

        workers = worker_processes(str(run_dir))
        assert len(workers) == 2
        for proc in workers:
            proc.send_signal(signal.SIGTERM)  # end the run: every rank stops at the same step and dumps its state
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            for proc in worker_processes(str(run_dir)):
                proc.kill()
            job.kill()
            job.wait(timeout=30)
    output = log.read_text()
    assert job.returncode == 0, output[-3000:]
    assert "world size 2 -> 1" in output and "world size 1 -> 2" in output
    r0, r1 = (torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["position"] == r1["position"]
    assert r0["position"]["step"] > grown_at
    assert_identical(r0["final"], r1["final"])  # the rejoined worker took rank 0's state and stayed in step
    assert_identical(r0["ema"], r1["ema"])
    # The EMA's update count went back to the last commit with the weights: one update per step taken.
    assert int(r0["ema"]["ema_updates"]) == r0["position"]["step"] - r0["position"]["skipped_steps"]
    # One MLflow run throughout, carried on by whichever process was rank 0.
    client = MlflowClient(f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("glow-dist-debug").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size"))
    assert [w for _, w in history] == [2.0, 1.0, 2.0]


@pytest.mark.slow
@pytest.mark.drills
def test_a_stop_signal_ends_an_elastic_job_with_a_checkpoint_and_it_resumes(tmp_path, digits_shards):
    """`glow-dist train dist.elastic=true` under glow-dist-horovodrun's elastic launch (as launch/celeba_hq_256.sh
    runs it with HOST_DISCOVERY, and the sbatch script with ELASTIC=1), SIGTERM to the job's process group (`timeout`,
    scancel): both ranks stop after the same step, rank 0 writes a verified checkpoint, the launcher exits with
    train.stop_exit_code (not a restart of the "failed" workers), and the same command resumes from that step."""
    run_dir, hosts_file = tmp_path / "run", tmp_path / "hosts.txt"
    hosts_file.write_text("".join(f"{h}:1\n" for h in HOSTS))
    elastic_cmd(tmp_path, [])   # the same skips
    overrides = [f"data.root={digits_shards}", f"train.run_dir={run_dir}", f"tracking.local_dir={tmp_path / 'ml'}",
                 "train.log_every=2", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
                 "train.progress=false", "train.threads=1", "train.max_eval_batches=2", "dist.commit_every=5",
                 "tracking.log_checkpoints=none", "dist.elastic=true"]

    def launch(*extra: str) -> list[str]:
        return [str(BIN / "glow-dist-horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
                "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"), "--gloo",
                sys.executable, *train_cmd(*overrides, *extra)]

    env = env_with_venv({"GLOW_DIST_HOSTS_FILE": str(hosts_file)})
    log = tmp_path / "stop.log"
    with open(log, "w") as out:
        job = subprocess.Popen(launch("train.steps=1000000", "train.stop_exit_code=75"), cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: len(records(run_dir / "metrics.jsonl")) >= 4, 180, "steps on 2 workers", log)
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
    output = log.read_text()
    assert job.returncode == 75, output[-3000:]
    (path,) = list_checkpoints(run_dir)
    verify_checkpoint(path)
    step = load_checkpoint(path)["position"]["step"]
    assert f"stopped by SIGTERM at step {step}; checkpoint {path} saved and verified" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("glow-dist-debug").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["stop.step"] == str(step)

    resumed = subprocess.run(launch(f"train.steps={step + 3}"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"resumed from {path}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert final["position"]["step"] == step + 3 and final["mlflow_run_id"] == run.info.run_id
