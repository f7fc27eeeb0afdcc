"""Failures produced for real: NaN streaks, kill -9 of the whole job, SIGTERM, a tracking server that goes away."""
from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest
from helpers import (
    BASE,
    DETERMINISTIC,
    REPO,
    assert_identical,
    copy_run,
    env_with_venv,
    horovodrun_cmd,
    load_ckpt,
    run_check,
    train_cli,
    train_cmd,
    wait_for,
)
from mlflow.tracking import MlflowClient
from test_tracking import Server

pytestmark = pytest.mark.slow


def trainer_processes(marker: str, python_only: bool = False) -> list[psutil.Process]:
    """The processes of the training ranks whose command line holds `marker` (a unique run dir): each rank and the
    `sh -c` Horovod wraps it in (or only the Python ranks), never the launcher."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd and "glow_dist" in cmd and "horovodrun" not in cmd:
            if not python_only or proc.info["name"].startswith("python"):
                found.append(proc)
    return found


def test_nan_streak_rolls_back_with_lower_lr(tmp_path, digits_shards):
    overrides = BASE + [f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}", "train.steps=10",
                        "train.max_consecutive_skips=3", "optim.rollback_lr_factor=0.5",
                        f"tracking.local_dir={tmp_path / 'mlflow'}"]
    # Steps 4, 5, 6 fail on alternating ranks: a streak of 3 collective skips triggers the rollback to step 3.
    r0, r1 = run_check(2, tmp_path / "out", overrides, env={"GLOW_DIST_INJECT_NONFINITE": "3:1,4:0,5:1"})
    for r in (r0, r1):
        assert r["position"]["rollbacks"] == 1 and r["position"]["lr_scale"] == 0.5
        assert r["position"]["skipped_steps"] == 3 and r["position"]["step"] == 10
    assert_identical(r0["final"], r1["final"])
    final = load_ckpt(tmp_path / "run", 10)
    assert final["position"]["rollbacks"] == 1  # persisted, so a resume keeps the lowered rate
    assert not (tmp_path / "run" / "checkpoints" / "ckpt-00000006.pt").exists() or \
        load_ckpt(tmp_path / "run", 6)["position"]["rollbacks"] == 1  # none written mid-streak


@pytest.mark.drills
def test_kill9_of_the_whole_job_then_rerun_matches_uninterrupted(tmp_path, digits_shards):
    def overrides(run: str) -> list[str]:
        return BASE + [f"data.root={digits_shards}", f"train.run_dir={tmp_path / run}", "train.steps=40",
                       "train.checkpoint_every=4", "train.eval_every=1000", "train.sample_every=1000",
                       "train.deterministic=true", f"tracking.local_dir={tmp_path / 'mlflow'}"]

    train_cli(*overrides("straight"), np=2)
    cmd = horovodrun_cmd(2, *train_cmd(*overrides("crashed")))
    job = subprocess.Popen(cmd, cwd=REPO, env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    ckpts = tmp_path / "crashed" / "checkpoints"
    try:
        wait_for(lambda: (ckpts / "ckpt-00000008.pt.sha256").exists(), 180, "the step-8 checkpoint")
        chain = trainer_processes(str(tmp_path / "crashed"))  # each rank and the `sh -c` Horovod wraps it in
        assert sum(p.name().startswith("python") for p in chain) == 2
        for proc in [*chain, psutil.Process(job.pid)]:
            proc.send_signal(signal.SIGKILL)  # every training process and the launcher, no warning
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert not (ckpts / "ckpt-00000040.pt").exists(), "the job finished before it was killed: nothing was tested"
    killed_at = max(int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.pt"))
    run_id_before = load_ckpt(tmp_path / "crashed", killed_at)["mlflow_run_id"]
    train_cli(*overrides("crashed"), np=2)  # the same command again
    resumed, straight = load_ckpt(tmp_path / "crashed", 40), load_ckpt(tmp_path / "straight", 40)
    assert_identical(straight["model"], resumed["model"])
    assert_identical(straight["ema"], resumed["ema"])
    assert resumed["mlflow_run_id"] == run_id_before  # the same MLflow run continued


@pytest.mark.drills
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, digits_shards):
    run_dir = tmp_path / "run"
    common = BASE + [f"data.root={digits_shards}", f"train.run_dir={run_dir}", "train.checkpoint_every=1000",
                     "train.eval_every=1000", "train.sample_every=1000", f"tracking.local_dir={tmp_path / 'mlflow'}"]
    job = subprocess.Popen(horovodrun_cmd(2, *train_cmd(*common, "train.steps=100000")), cwd=REPO,
                           env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0,
                 180, "the first metrics")
        for proc in trainer_processes(str(run_dir), python_only=True):
            proc.send_signal(signal.SIGTERM)  # what a scheduler does to the training tasks when it preempts the job
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    (saved,) = list((run_dir / "checkpoints").glob("ckpt-*.pt"))
    step = int(saved.stem.split("-")[1])
    assert 0 < step < 100000
    train_cli(*common, f"train.steps={step + 2}", np=2)  # resumes from the preemption checkpoint
    assert load_ckpt(run_dir, step + 2)["position"]["step"] == step + 2


def test_tracking_server_restart_mid_run_loses_no_metrics(tmp_path, digits_shards):
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server").start()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, *train_cmd(*BASE, f"data.root={digits_shards}", f"train.run_dir={run_dir}",
                                      "train.steps=1000000", "train.log_every=5", "train.eval_every=1000000",
                                      "train.sample_every=1000000", "train.checkpoint_every=1000000",
                                      f"tracking.uri={server.uri}", "tracking.log_checkpoints=false")]
    job = subprocess.Popen(cmd, cwd=REPO, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    metrics = run_dir / "metrics.jsonl"

    def logged() -> int:
        return metrics.read_text().count("bits_per_dim/train") if metrics.exists() else 0

    try:
        wait_for(lambda: logged() >= 2, 180, "the first metrics")
        server.stop()
        away = logged()
        wait_for(lambda: logged() >= away + 5, 120, "metrics logged while the server is away")
        server.start()  # the same port and database, as after a server restart
        back = logged()
        wait_for(lambda: logged() >= back + 2, 120, "metrics logged after the server came back")
        job.send_signal(signal.SIGTERM)  # end the run: the final flush sends whatever is still buffered
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    try:
        assert job.returncode == 0, output[-3000:]
        assert "is unreachable" in output  # the user was told
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("glow-dist-debug").experiment_id])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "bits_per_dim/train"))
    finally:
        server.stop()
    total = logged()
    assert total > away + 5
    assert steps == list(range(5, 5 * total + 1, 5)), f"missing: {sorted(set(range(5, 5 * total + 1, 5)) - set(steps))}"


def test_resume_with_a_different_architecture_is_refused(tmp_path, digits_shards, unbroken_run):
    run_dir = copy_run(unbroken_run(*DETERMINISTIC), tmp_path / "run")  # checkpoints of the debug model
    common = [*DETERMINISTIC, f"data.root={digits_shards}", f"train.run_dir={run_dir}", "train.steps=8",
              f"tracking.local_dir={tmp_path / 'mlflow'}"]
    out = subprocess.run([sys.executable, *train_cmd(*common, "model.width=32", "model.coupling=additive")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2
    assert "different model" in out.stderr and "model.width: checkpoint 16 vs config 32" in out.stderr


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, digits_shards, unbroken_run):
    copy_run(unbroken_run(*DETERMINISTIC), tmp_path / "run")  # checkpoints at 3 and 6
    common = [*DETERMINISTIC, f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}",
              f"tracking.local_dir={tmp_path / 'mlflow'}", "train.keep_checkpoints=5"]
    newest = tmp_path / "run" / "checkpoints" / "ckpt-00000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, *train_cmd(*common, "train.steps=8")], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ckpt-00000006.pt" in out.stdout + out.stderr and "checksum" in out.stdout + out.stderr
    assert load_ckpt(tmp_path / "run", 8)["position"]["step"] == 8
    assert "ckpt-00000003.pt" in out.stderr  # resumed from the previous one
