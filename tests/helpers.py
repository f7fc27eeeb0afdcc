"""Helpers shared by the multi-process tests: launching horovodrun and the trainer, comparing weights."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_CHECK = REPO / "tests" / "scripts" / "train_check.py"

# A few steps of the debug model with every periodic action exercised.
BASE = ["train.steps=6", "train.log_every=2", "train.eval_every=3", "train.sample_every=3",
        "train.checkpoint_every=3", "train.progress=false", "train.threads=1", "train.max_eval_batches=4"]

# BASE in deterministic mode: a resumed run must end bit for bit where the unbroken one (conftest's unbroken_run) ends.
DETERMINISTIC = (*BASE, "train.deterministic=true")


def horovodrun_cmd(np: int, *args: str) -> list[str]:
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, *args]


def env_with_venv(extra: dict | None = None) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(extra or {})}


def horovodrun(np: int, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(horovodrun_cmd(np, *args), capture_output=True, text=True, cwd=REPO, timeout=timeout,
                         env=env_with_venv(env))
    assert out.returncode == 0, f"horovodrun failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def train_cmd(*overrides: str, config: str = "configs/debug.yaml") -> list[str]:
    return ["-m", "glow_dist", "train", "--config", config, *overrides]


def train_cli(*overrides: str, np: int = 1, env: dict | None = None) -> None:
    if np > 1:
        horovodrun(np, *train_cmd(*overrides), env=env)
        return
    out = subprocess.run([sys.executable, *train_cmd(*overrides)], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=env_with_venv(env))
    assert out.returncode == 0, out.stderr[-4000:]


def run_check(np: int, outdir: Path, overrides: list[str], env: dict | None = None) -> list[dict]:
    """Run tests/scripts/train_check.py on `np` ranks; return each rank's dump."""
    horovodrun(np, str(TRAIN_CHECK), str(outdir), "--config", "configs/debug.yaml", *overrides, env=env)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(np)]


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of a run directory (a shared unbroken_run is never written in)."""
    shutil.copytree(run_dir, to)
    return to


def load_ckpt(run_dir: Path, step: int) -> dict:
    # weights_only=True: what the trainer writes must load without any allowlist
    return torch.load(run_dir / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)


class RunsCode:
    """Pickled, this makes any unpickler that honours it (torch.load(weights_only=False), pickle.load) run
    `touch marker`: the payload of a planted checkpoint, model or data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def save_with_sidecar(state: object, path: Path) -> Path:
    """torch.save `state` to `path` with a correct sha256 sidecar, as anyone who can write the one can write both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return path


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    """Poll `predicate` every 0.2 s until it returns something truthy (returned); fail naming `what` (and the
    tail of `log`, if given) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    tail = f"; log tail:\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's -o size=, e.g. 4m, 2g) mounted on the existing folder `mount` for the block, lazily
    unmounted after it, even when the test fails; skips with the reason where it cannot be mounted (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; run as root (CI does)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a container needs CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
