"""Atomic, checksummed checkpoints with keep-last-k rotation, and RNG state capture.

Layout under a run directory:

    run_dir/checkpoints/ckpt-00001200.pt          torch.save of the trainer's state dict
    run_dir/checkpoints/ckpt-00001200.pt.sha256   "<hex digest>  ckpt-00001200.pt" (sha256sum format)

A checkpoint counts only once its sidecar exists, and both are moved into place with os.replace, so a process
killed mid-write leaves at most a `.tmp-*` file that is never picked up. The state layout is the trainer's business;
this module only stores, verifies and finds it. Only rank 0 saves; every rank may load.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or fails its checksum; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _drill_slow_write()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drill_slow_write() -> None:
    # Fault drill: GLOW_DIST_INJECT_SLOW_CHECKPOINT=SECONDS holds every write here, its temporary file complete but
    # not yet renamed, as a multi-GB checkpoint would be; tests kill a stopping job at this point.
    delay = float(os.environ.get("GLOW_DIST_INJECT_SLOW_CHECKPOINT", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (file and checksum sidecar present), oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and _sidecar(p).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep: int) -> Path:
    """Write `state` as checkpoints/ckpt-<step>.pt atomically with its sha256, then keep only the last `keep`.

    `keep <= 0` keeps every checkpoint. Returns the path of the new checkpoint.
    """
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.pt"
    _sidecar(path).unlink(missing_ok=True)  # re-saving a step: it must not look complete until rewritten
    _write_atomic(path, lambda f: torch.save(state, f))
    digest = _sha256(path)  # hash what reached the file, not the in-memory bytes
    _write_atomic(_sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    _fsync_dir(directory)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != path:  # never the one just written, whatever the step numbers say
                _sidecar(old).unlink(missing_ok=True)  # sidecar first: a half-deleted pair is never "complete"
                old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (by step), unverified; None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless `path` exists and matches its sha256 sidecar."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; it was not completely written")
    fields = sidecar.read_text().split()
    expected = fields[0] if fields else ""
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} fails its checksum (sha256 {actual[:12]}..., expected {expected[:12]}...): "
            "the file is corrupt or was modified; delete it to resume from the previous one"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify `path` against its checksum, then load it; raise CheckpointError naming the file on any failure."""
    verify_checkpoint(path)
    try:
        # weights_only=False: the state holds numpy/python RNG states and config dicts, written by us.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {e}") from e


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """Newest checkpoint that verifies and loads, walking back past broken ones; None when none is usable."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            print(f"[checkpoint] skipping {path.name}: {e}", flush=True)
    return None


def open_checkpoint(path_or_run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """A checkpoint file, the newest valid checkpoint of a run directory, or a logged MLflow model (`models:/NAME/V`,
    `runs:/RUN_ID/model`: its weights file is downloaded); CheckpointError names what is missing."""
    if re.match(r"^(models|runs):/", str(path_or_run_dir)):
        from glow_dist.mlflow_model import download_weights  # imports MLflow: only for a model URI

        path_or_run_dir = download_weights(str(path_or_run_dir))
    path = Path(path_or_run_dir)
    if path.is_dir():
        found = load_latest(path, map_location)
        if found is None:
            raise CheckpointError(f"no valid checkpoint under {checkpoint_dir(path)}; pass a ckpt-*.pt file or a "
                                  "run directory that a finished training step wrote to")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a ckpt-*.pt file or a run directory")
    return path, load_checkpoint(path, map_location)


def rng_state() -> dict:
    """RNG states of python `random`, numpy, torch CPU and (when available) every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured; CUDA states are restored only when CUDA is available."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
