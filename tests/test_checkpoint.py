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


# ---- re-saving a step, and what killed writes leave -------------------------------------------------------------

def _writer(run_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/checkpoint_writer.py"), str(run_dir), *args],
                            env=env, stdout=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen, line: str) -> None:
    got = proc.stdout.readline().strip()
    while got and got != line:
        got = proc.stdout.readline().strip()
    assert got == line, f"the writer never printed {line!r} (exit {proc.poll()})"


def _held_temporary(directory: Path, timeout: float = 120) -> Path:
    """The temporary file of a write held before its rename (complete: no longer growing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in directory.iterdir() if p.name.startswith(".tmp-ckpt-") and ".sha256" not in p.name]
        if found:
            size = found[0].stat().st_size
            time.sleep(0.5)
            if found[0].exists() and found[0].stat().st_size == size and size > 0:
                return found[0]
        time.sleep(0.1)
    raise AssertionError("no held temporary checkpoint file appeared")


@pytest.mark.slow   # a second process writing 20 MB checkpoints
def test_sigkill_while_a_step_is_resaved_keeps_its_old_checkpoint(tmp_path: Path) -> None:
    """A finished step written again (keep=1) and SIGKILLed while the new file is complete but not yet renamed: the
    old file is still a checkpoint that verifies and resume=auto finds (it used to lose its sidecar first, leaving
    nothing to resume from). The next start removes the dead writer's temporary file and trims the sidecar."""
    proc = _writer(tmp_path, "--resave", "600")
    directory = checkpoint_dir(tmp_path)
    try:
        _read_until(proc, "resaving 1")
        temporary = _held_temporary(directory)
        path, state = load_latest(tmp_path)   # while the rewrite is held: the old file is still the checkpoint
        assert path.name == "ckpt-00000001.pt" and bool((state["big"] == 1.0).all())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert temporary.exists(), "killed after the rename: nothing tested"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    path, state = load_latest(tmp_path)
    assert bool((state["big"] == 1.0).all()), "the old checkpoint must be the one in place"
    assert len(Path(str(path) + ".sha256").read_text().splitlines()) == 2   # old and new digest, mid-switch
    from glow_dist.training.checkpoint_folder import remove_leftovers

    size = temporary.stat().st_size
    removed, live = remove_leftovers(tmp_path)
    assert [(p.name, n) for p, n, _ in removed] == [(temporary.name, size)] and live == []
    assert size > 10_000_000 and not temporary.exists()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(str(path) + ".sha256").read_text() == f"{digest}  {path.name}\n"   # trimmed to the file's line
    assert bool((load_checkpoint(path)["big"] == 1.0).all())


def test_a_resave_that_fills_the_disk_leaves_the_old_checkpoint(small_disk: Path) -> None:
    """A re-save of the same step on a full disk (a 4 MiB tmpfs): the error says the previous checkpoints are intact,
    and they are: the old file of that step still verifies and is the newest checkpoint."""
    from glow_dist.checkpoint import CheckpointWriteError, verify_checkpoint

    save_checkpoint({"step": 3, "w": torch.full((400_000,), 3.0)}, small_disk, step=3, keep=1)   # 1.6 MB
    with pytest.raises(CheckpointWriteError, match="the previous checkpoints are intact"):
        save_checkpoint({"step": 3, "w": torch.full((700_000,), 4.0)}, small_disk, step=3, keep=1)   # 2.8 MB
    (path,) = list_checkpoints(small_disk)
    verify_checkpoint(path)
    assert bool((load_checkpoint(path)["w"] == 3.0).all())
    assert sorted(p.name for p in checkpoint_dir(small_disk).iterdir()) == [path.name, path.name + ".sha256"]


def test_a_resave_replaces_the_file_and_leaves_one_digest(tmp_path: Path) -> None:
    first = save_checkpoint(_state(5), tmp_path, step=5, keep=1)
    save_checkpoint({**_state(5), "weights": torch.full((16,), 9.0)}, tmp_path, step=5, keep=1)
    assert torch.equal(load_checkpoint(first)["weights"], torch.full((16,), 9.0))
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert Path(str(first) + ".sha256").read_text() == f"{digest}  {first.name}\n"
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [first.name, first.name + ".sha256"]


@pytest.mark.slow   # a second process writing 200 MB checkpoints
def test_leftovers_of_killed_writes_are_removed_but_never_a_live_writers(tmp_path: Path) -> None:
    """A live writer's temporary file (held before its rename) is left and named; SIGKILLed, the same file is
    removed with its size, and so are a checkpoint without its sidecar (an earlier version's write cut between its
    two renames) and a sidecar without its checkpoint. Complete checkpoints and other files are untouched."""
    from glow_dist.training.checkpoint_folder import remove_leftovers

    save_checkpoint(_state(1), tmp_path, step=1, keep=0)
    proc = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, torch\n"
        "from glow_dist.checkpoint import save_checkpoint\n"
        "os.environ['GLOW_DIST_INJECT_SLOW_CHECKPOINT'] = '600'\n"
        "save_checkpoint({'big': torch.ones(5_000_000)}, sys.argv[1], 2, keep=0)\n"), str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    directory = checkpoint_dir(tmp_path)
    try:
        temporary = _held_temporary(directory)
        removed, live = remove_leftovers(tmp_path)
        assert removed == [] and [(p.name, f"pid {proc.pid}" in who) for p, who in live] == [(temporary.name, True)]
        assert temporary.exists() and (directory / "ckpt-00000002.pt.sha256").exists()   # its sidecar too
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    save_checkpoint(_state(3), tmp_path, step=3, keep=0)
    Path(str(checkpoint_dir(tmp_path) / "ckpt-00000003.pt") + ".sha256").unlink()   # written, never completed
    (directory / "notes.txt").write_text("mine")
    size = temporary.stat().st_size
    removed, live = remove_leftovers(tmp_path)
    found = {p.name: (n, why) for p, n, why in removed}
    assert live == [] and set(found) == {temporary.name, "ckpt-00000002.pt.sha256", "ckpt-00000003.pt"}
    assert found[temporary.name][0] == size >= 20_000_000
    assert "never completed" in found["ckpt-00000003.pt"][1]
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256", "notes.txt"]
    assert remove_leftovers(tmp_path) == ([], [])


def _bytes_read_from_storage() -> int:
    """What this process has caused to be fetched from the storage layer (not the page cache), in bytes."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def test_the_stop_checkpoints_read_back_reads_the_disk(tmp_path: Path) -> None:
    """The read-back of a stop checkpoint (read_back=True) fetches the file's bytes from the disk, not the page cache
    that the write has just filled (it used to read the cache: 0 bytes from the disk)."""
    if not Path("/proc/self/io").exists():
        pytest.skip("no /proc/self/io (I/O accounting) on this kernel")
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: the page cache is the only copy, there is no disk to read")
    big = torch.rand(24_000_000)   # 96 MB: a block of 64 MiB and its tail
    before = _bytes_read_from_storage()
    path = save_checkpoint({"big": big, "step": 1}, tmp_path, step=1, keep=1, read_back=True)
    read = _bytes_read_from_storage() - before
    assert read >= 0.95 * path.stat().st_size, f"{read} bytes read from the disk for a {path.stat().st_size}-byte file"
