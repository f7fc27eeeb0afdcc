"""Checkpoints: atomic writes, keep-last-k, checksum fallback, and a real SIGKILL mid-write."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glow_dist.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def _newest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((16,), float(step)), "config": {"model": {"levels": 2}}}


@pytest.mark.parametrize("read_back", [False, True])   # True: the stop checkpoint, read back as it is written
def test_save_is_complete_and_checksummed(tmp_path: Path, read_back: bool) -> None:
    path = save_checkpoint(_state(7), tmp_path, step=7, keep=3, read_back=read_back)
    assert path == checkpoint_dir(tmp_path) / "ckpt-00000007.pt"
    digest, name = Path(str(path) + ".sha256").read_text().split()
    assert (digest, name) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.name)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [path.name, path.name + ".sha256"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], _state(7)["weights"])
    assert loaded["config"] == {"model": {"levels": 2}}


def test_large_tensors_are_hashed_as_written(tmp_path: Path) -> None:
    """Tensors larger than a write block (written in place, in several blocks) and small entries gathered into
    blocks: the sidecar is the sha256 of the whole file, which loads back exactly."""
    big = torch.arange(40_000_000, dtype=torch.float32)   # 160 MB: three 64 MiB blocks
    path = save_checkpoint({"big": big, "small": torch.ones(3), "step": 1}, tmp_path, step=1, keep=1, read_back=True)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    assert Path(str(path) + ".sha256").read_text().split()[0] == digest.hexdigest()
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["big"], big) and loaded["step"] == 1


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, step=1, keep=3)
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails; which error is torch's business)
        save_checkpoint({"bad": lambda: None}, tmp_path, step=2, keep=3)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256"]
    assert _newest(tmp_path).name == "ckpt-00000001.pt"


def test_keep_last_k(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(_state(step), tmp_path, step=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000040.pt", "ckpt-00000050.pt"]
    assert len(list(checkpoint_dir(tmp_path).iterdir())) == 4   # no stray sidecars or temp files
    assert _newest(tmp_path).name == "ckpt-00000050.pt"
    # keep <= 0 keeps everything
    for step in (60, 70):
        save_checkpoint(_state(step), tmp_path, step=step, keep=0)
    assert len(list_checkpoints(tmp_path)) == 4


def test_latest_is_none_without_checkpoints(tmp_path: Path) -> None:
    assert _newest(tmp_path) is None and load_latest(tmp_path) is None


def test_corrupt_newest_falls_back_to_previous(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, step=step, keep=3)
    newest = _newest(tmp_path)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch might still load it, the checksum must not
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt-00000003.pt.*checksum"):
        load_checkpoint(newest)
    path, state = load_latest(tmp_path)
    assert path.name == "ckpt-00000002.pt" and state["step"] == 2
    assert "skipping ckpt-00000003.pt" in capsys.readouterr().out
    # a truncated file and a missing checksum are both refused too
    (checkpoint_dir(tmp_path) / "ckpt-00000002.pt").write_bytes(b"")
    Path(str(checkpoint_dir(tmp_path) / "ckpt-00000001.pt") + ".sha256").unlink()
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(checkpoint_dir(tmp_path) / "ckpt-00000001.pt")
    assert load_latest(tmp_path) is None


@pytest.mark.slow   # a second process writing 200 MB checkpoints
def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/checkpoint_writer.py"), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, text=True)
    directory = checkpoint_dir(tmp_path)
    try:
        assert proc.stdout.readline().strip() == "saved 1", "the writer did not finish its first checkpoint"
        deadline = time.monotonic() + 60
        partial = []
        while not partial:  # wait until the next checkpoint is being written, then kill it there
            assert time.monotonic() < deadline and proc.poll() is None, "the writer never started a second save"
            partial = [p for p in directory.iterdir() if p.name.startswith(".tmp-") and ".sha256" not in p.name
                       and p.stat().st_size > 0]
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    saved = [int(line.split()[1]) for line in ["saved 1", *proc.stdout.read().splitlines()]]
    assert any(p.name.startswith(".tmp-") for p in directory.iterdir()), "killed after the write: nothing tested"
    assert _newest(tmp_path).name == f"ckpt-{saved[-1]:08d}.pt"
    path, state = load_latest(tmp_path)
    assert state["step"] == saved[-1] and bool((state["big"] == saved[-1]).all())
