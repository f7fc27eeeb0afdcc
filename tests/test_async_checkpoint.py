"""Checkpoints written in the background (train.async_checkpoint), and their faults produced for real: the process
SIGKILLed while a background write is held on disk, a disk that fills during the write (a small tmpfs mounted by
the test), a stop signal while a write is in flight, and a write that fails in the background."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_identical, env_with_venv, load_ckpt, train_cmd, wait_for

from glow_dist.checkpoint import (
    CheckpointWriteError,
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from glow_dist.config import load_config
from glow_dist.model import build_model
from glow_dist.tracking.reporter import NullReporter
from glow_dist.training.background import HostSnapshot
from glow_dist.training.checkpoints import CheckpointManager
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import make_optimizer
from glow_dist.training.state import TrainingState

# The debug model, one metrics line per step, nothing periodic but checkpoints.
QUIET = ["train.log_every=1", "train.eval_every=0", "train.sample_every=0", "train.progress=false",
         "train.threads=1", "train.max_eval_batches=2", "tracking.log_checkpoints=none", "tracking.log_model=false",
         "data.backend=webdataset", "train.deterministic=true", "train.checkpoint_every=2"]


def run(tmp_path: Path, shards: Path, run_dir: Path, *extra: str, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *train_cmd(*QUIET, f"data.root={shards}", f"train.run_dir={run_dir}",
                                                     f"tracking.local_dir={tmp_path / 'mlflow'}", *extra)],
                         cwd=REPO, env=env_with_venv(env), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def last_logged_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def temporary_files(run_dir: Path) -> list[str]:
    return [p.name for p in checkpoint_dir(run_dir).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
@pytest.mark.drills
def test_sigkill_during_a_background_write_resumes_the_previous_checkpoint(tmp_path, digits_shards):
    """The write of step 4 is held on disk (complete but not renamed) while training goes on to step 5: SIGKILL
    there leaves step 2 as the newest checkpoint, and the resumed run ends with the weights of an unbroken one."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run(tmp_path, digits_shards, straight, "train.steps=8")
    run(tmp_path, digits_shards, crashed, "train.steps=2")
    previous = list_checkpoints(crashed)[-1]
    job = subprocess.Popen([sys.executable, *train_cmd(*QUIET, f"data.root={digits_shards}",
                                                       f"train.run_dir={crashed}", "train.steps=8",
                                                       f"tracking.local_dir={tmp_path / 'mlflow'}")],
                           cwd=REPO, env=env_with_venv({"GLOW_DIST_INJECT_SLOW_CHECKPOINT": "600"}),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Training goes on while the step-4 checkpoint is being written: that is what is killed.
        wait_for(lambda: last_logged_step(crashed) >= 5 and temporary_files(crashed), 240,
                 "step 5 trained while the step-4 checkpoint's write is in flight")
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert list_checkpoints(crashed) == [previous]   # the held write is a .tmp file, never a checkpoint
    verify_checkpoint(previous)
    leftovers = sorted(p.name for p in checkpoint_dir(crashed).iterdir() if p.name not in
                       (previous.name, previous.name + ".sha256"))
    assert leftovers, "the held write left nothing: nothing to clean"
    out = run(tmp_path, digits_shards, crashed, "train.steps=8")
    assert f"resumed from {previous}" in out.stderr, out.stderr[-3000:]
    cleaned = next(line for line in out.stdout.splitlines() if "removed what interrupted checkpoint writes" in line)
    assert all(name in cleaned for name in leftovers) and "freed" in cleaned, cleaned
    assert temporary_files(crashed) == []
    resumed, unbroken = load_ckpt(crashed, 8), load_ckpt(straight, 8)
    assert resumed["position"] == unbroken["position"]
    assert_identical(unbroken["model"], resumed["model"])
    assert_identical(unbroken["ema"], resumed["ema"])


@pytest.mark.slow
@pytest.mark.drills
def test_a_full_disk_stops_training_with_a_clear_error_and_exit_74(tmp_path, digits_shards, small_disk):
    """The disk fills while the step-4 checkpoint is written in the background: the error reaches the training
    thread, names the directory and the space needed, the partial file is gone, step 2 is intact, exit 74."""
    run_dir = small_disk / "run"
    run(tmp_path, digits_shards, run_dir, "train.steps=2")
    previous = list_checkpoints(run_dir)[-1]
    size = previous.stat().st_size
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))   # room for half a checkpoint
    out = run(tmp_path, digits_shards, run_dir, "train.steps=40", check=False)
    assert out.returncode == 74, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("glow-dist train: disk error: checkpoint ckpt-00000004.pt could not be written: the "
                            f"disk of {checkpoint_dir(run_dir)} is full"), error
    assert "needs about" in error and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert temporary_files(run_dir) == [] and list_checkpoints(run_dir) == [previous]
    assert load_checkpoint(previous)["position"]["step"] == 2
    assert last_logged_step(run_dir) < 40   # training stopped instead of going on without checkpoints


@pytest.mark.slow
@pytest.mark.drills
def test_a_stop_while_a_write_is_in_flight_supersedes_it(tmp_path, digits_shards):
    """SIGTERM while a periodic checkpoint's write is held: the write in flight when the stop is voted is given up
    (its temporary file removed), the stop step's checkpoint is written and verified, and the run exits with
    train.stop_exit_code. Which write is given up depends on when the signal lands: step 2's; or, if the signal
    lands while step 4 waits for step 2's write, step 4's. A stop voted at step 4 itself (a checkpoint step) skips
    step 4's periodic checkpoint and gives up step 2's write: it used to wait for it, start step 4's write and
    then find its own write done, giving nothing up (seen in CI on a loaded machine)."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen([sys.executable, *train_cmd(*QUIET, f"data.root={digits_shards}",
                                                       f"train.run_dir={run_dir}", "train.steps=100000",
                                                       "train.stop_exit_code=75",
                                                       f"tracking.local_dir={tmp_path / 'mlflow'}")],
                           # every write held 10 s. A periodic write is then in flight almost all the time (each
                           # checkpoint step waits for the previous write and starts its own at once), so whenever
                           # the stop is voted one is given up; a superseded write stops holding at once, the stop
                           # checkpoint's own write is held too. (Holding longer did not help against the bug
                           # above: CI failed with 30 s.)
                           cwd=REPO, env=env_with_venv({"GLOW_DIST_INJECT_SLOW_CHECKPOINT": "10"}),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: checkpoint_dir(run_dir).is_dir() and temporary_files(run_dir), 240,
                 "the step-2 checkpoint's write in flight")
        os.killpg(job.pid, signal.SIGTERM)
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 75, output[-3000:]
    newest = list_checkpoints(run_dir)[-1]
    verify_checkpoint(newest)
    step = load_checkpoint(newest)["position"]["step"]
    given_up = re.search(rf"the write of step (\d+) was given up for the stop checkpoint of step {step}\b", output)
    assert given_up is not None, output[-3000:]
    assert checkpoint_path(run_dir, int(given_up.group(1))) not in list_checkpoints(run_dir)
    assert f"stopped by SIGTERM at step {step}; checkpoint {newest}" in output, output[-3000:]
    assert temporary_files(run_dir) == []


@pytest.mark.slow
@pytest.mark.drills
def test_a_stop_after_a_failed_periodic_write_still_writes_its_checkpoint(tmp_path, digits_shards):
    """The periodic write of step 2 fails (a directory stands where its file goes: an OSError at the rename, as an
    I/O error would be) and the stop is voted at step 3, before the failure was raised: the stop checkpoint of step 3
    is written and verified all the same, the failure is reported, and the run exits train.stop_exit_code. (The
    failure used to be raised on the stop step: exit 74 and no stop checkpoint.)"""
    run_dir = tmp_path / "run"
    checkpoint_path(run_dir, 2).mkdir(parents=True)
    job = subprocess.Popen([sys.executable, *train_cmd(*QUIET, f"data.root={digits_shards}",
                                                       f"train.run_dir={run_dir}", "train.steps=100000",
                                                       "train.stop_exit_code=75",
                                                       f"tracking.local_dir={tmp_path / 'mlflow'}")],
                           # every step lasts 8 s more: the signal lands in step 2's wait, after its vote
                           cwd=REPO, env=env_with_venv({"GLOW_DIST_INJECT_SLOW_STEP": "8"}),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 1, 240, "step 1")
        time.sleep(3)
        assert last_logged_step(run_dir) == 1, "too late: step 2 already ended"
        os.killpg(job.pid, signal.SIGTERM)
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 75, output[-3000:]
    assert "the write of step 2 had failed: checkpoint ckpt-00000002.pt could not be written" in output, output[-3000:]
    (newest,) = list_checkpoints(run_dir)
    verify_checkpoint(newest)
    assert load_checkpoint(newest)["position"]["step"] == 3
    assert f"stopped by SIGTERM at step 3; checkpoint {newest}" in output, output[-3000:]


class Messages(NullReporter):
    """The reporter's interface, keeping what rank 0 would print and tag."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tagged: dict[str, str] = {}

    def message(self, text: str) -> None:
        self.lines.append(text)

    def tags(self, tags: dict[str, str]) -> None:
        self.tagged.update(tags)


def test_the_stop_checkpoint_is_written_after_a_write_that_failed(tmp_path):
    """A background write that failed before the stop (here its target is a directory) is reported and tagged, and
    the stop checkpoint is written and verified all the same (it used to raise the old failure instead)."""
    manager, report = debug_manager(tmp_path), Messages()
    checkpoint_path(tmp_path, 2).mkdir(parents=True)
    manager.save(2, report, world_size=1)
    wait_for(lambda: manager._in_flight[0].done(), 60, "the failed write of step 2")
    path = manager.save_verified(3, report, world_size=1)
    assert list_checkpoints(tmp_path) == [path] and path == checkpoint_path(tmp_path, 3)
    verify_checkpoint(path)
    (line,) = [line for line in report.lines if "had failed" in line]
    assert line.startswith("[checkpoint] the write of step 2 had failed: checkpoint ckpt-00000002.pt could not be "
                           "written") and "stop checkpoint of step 3" in line
    assert report.tagged["stop.failed_write"].startswith("step 2: checkpoint ckpt-00000002.pt could not be written")


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, digits_shards):
    """Checkpoints 4, 6, 8; resume explicitly from 4 and train to 7 with keep=2: the abandoned line's 6 and 8 are
    moved (verifiable, unchanged) into checkpoints/abandoned-after-step-00000004-*, the folder holds the new line's
    6 and 7, and the next train.resume=auto continues from 7. (Rotation by step number used to keep {7, 8} and auto
    went back to the abandoned 8.)"""
    run_dir = tmp_path / "run"
    run(tmp_path, digits_shards, run_dir, "train.steps=8", "train.keep_checkpoints=3")
    abandoned = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_checkpoints(run_dir)[1:]}
    assert sorted(abandoned) == ["ckpt-00000006.pt", "ckpt-00000008.pt"]
    out = run(tmp_path, digits_shards, run_dir, "train.steps=7", "train.keep_checkpoints=2",
              f"train.resume={checkpoint_path(run_dir, 4)}")
    assert f"resumed from {checkpoint_path(run_dir, 4)}" in out.stderr, out.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-00000006.pt", "ckpt-00000007.pt"]
    (folder,) = [p for p in checkpoint_dir(run_dir).iterdir() if p.is_dir()]
    assert folder.name.startswith("abandoned-after-step-00000004-")
    line = next(line for line in out.stdout.splitlines() if "starts a new line" in line)
    assert str(folder) in line and "ckpt-00000006.pt, ckpt-00000008.pt" in line, line
    assert sorted(p.name for p in folder.iterdir()) == sorted([*abandoned, *(n + ".sha256" for n in abandoned)])
    for name, digest in abandoned.items():
        verify_checkpoint(folder / name)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    # what the next job's train.resume=auto picks: the trainer's own choice, in this process (a third job took 40 s)
    path, _ = debug_manager(run_dir).find_resume()
    assert path == checkpoint_path(run_dir, 7)


def debug_manager(run_dir: Path, *overrides: str) -> CheckpointManager:
    cfg = load_config(REPO / "configs" / "debug.yaml", [f"train.run_dir={run_dir}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = TrainingState(cfg, model, make_optimizer(cfg.optim, model), EMA(model, cfg.optim.ema_decay))
    return CheckpointManager(cfg, state, main=True)


def test_a_background_write_error_is_raised_on_the_training_thread(tmp_path):
    """A write that fails in the background thread (here: its target is a directory) is raised by the next
    poll/wait on the caller's thread, never lost; the checkpoints before it are intact."""
    manager = debug_manager(tmp_path)
    manager.save(2, NullReporter(), world_size=1)
    manager.wait(NullReporter())
    (checkpoint_dir(tmp_path) / "ckpt-00000004.pt").mkdir()   # os.replace over a directory fails
    manager.save(4, NullReporter(), world_size=1)   # returns at once: the write runs in the background
    expected = f"ckpt-00000004.pt could not be written to {checkpoint_dir(tmp_path)}"
    with pytest.raises(CheckpointWriteError, match=expected):
        manager.wait(NullReporter())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    assert temporary_files(tmp_path) == []


def test_a_resume_from_another_folder_starts_the_line_in_this_one(tmp_path, capsys):
    """train.resume=PATH of another run's step-4 checkpoint, in a folder holding 2 and 6: 6 is set aside, and the
    resumed file is hard-linked in as ckpt-4 (the same file, no copy), so that a job stopped before its first
    checkpoint resumes step 4 with auto, not 2 or the abandoned 6."""
    other, here = tmp_path / "other", tmp_path / "here"
    for folder, steps in ((other, [4]), (here, [2, 6])):
        writer = debug_manager(folder)
        for step in steps:
            writer.state.position.step = step   # as after training to it
            writer.save(step, NullReporter(), world_size=1)
            writer.wait(NullReporter())
    resumed = checkpoint_path(other, 4)
    path, _ = debug_manager(here, f"train.resume={resumed}").find_resume()
    assert path == resumed and [p.name for p in list_checkpoints(here)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert os.path.samefile(checkpoint_path(here, 4), resumed)
    verify_checkpoint(checkpoint_path(here, 4))
    (folder,) = [p for p in checkpoint_dir(here).iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000006.pt", "ckpt-00000006.pt.sha256"]
    assert "starts a new line of training" in capsys.readouterr().out
    assert debug_manager(here).find_resume()[0] == checkpoint_path(here, 4)   # auto: the new line's start


def test_a_snapshot_is_taken_before_training_changes_the_weights(tmp_path):
    """The background write holds a copy: weights changed right after save() do not reach the file."""
    manager = debug_manager(tmp_path)
    before = {k: v.clone() for k, v in manager.state.model.state_dict().items()}
    manager.save(2, NullReporter(), world_size=1)
    with torch.no_grad():
        for p in manager.state.model.parameters():
            p.add_(1.0)   # as the next optimizer step would, while the write may still be running
    manager.wait(NullReporter())
    assert_identical(before, load_checkpoint(list_checkpoints(tmp_path)[-1])["model"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_snapshot_reuses_its_host_buffers(device: str) -> None:
    """One copy per tensor into host buffers (pinned when the state is on a GPU), the same buffers at the next
    checkpoint, plain values as they are."""
    snapshot = HostSnapshot()
    state = {"w": torch.randn(300, 300, device=device), "moments": {"v": torch.randn(7, device=device)}, "step": 3}
    first = snapshot.take(state)
    assert first["w"].device.type == "cpu" and first["w"].is_pinned() == (device == "cuda") and first["step"] == 3
    assert torch.equal(first["w"], state["w"].cpu()) and snapshot.nbytes == (300 * 300 + 7) * 4
    pointer = first["w"].data_ptr()
    state["w"].add_(1.0)
    second = snapshot.take(state)
    assert second["w"].data_ptr() == pointer and torch.equal(second["w"], state["w"].cpu())
