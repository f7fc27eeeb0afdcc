"""The checkpoint file format: atomic, checksummed files with keep-last-k rotation.

Layout under a run directory:

    run_dir/checkpoints/ckpt-00001200.pt          torch.save of a state dict
    run_dir/checkpoints/ckpt-00001200.pt.sha256   "<hex digest>  ckpt-00001200.pt" (sha256sum format)

A checkpoint counts only once its sidecar exists, and both are moved into place with os.replace, so a process
killed mid-write leaves at most a `.tmp-*` file that is never picked up. What a state holds is the trainer's
business (glow_dist/training/state.py); this module only stores, verifies and finds it. Only rank 0 saves.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from glow_dist.files import fsync_dir, sha256_file, write_atomic

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
EMA_UPDATES_KEY = "ema_updates"   # in a state's "ema" entry: the EMA's update count, beside its weights


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or fails its checksum; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:08d}.pt"


def sidecar(path: str | Path) -> Path:
    """The sha256 file beside a checkpoint (or any file saved with `save_verified`)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _drill_slow_write() -> None:
    # Fault drill: GLOW_DIST_INJECT_SLOW_CHECKPOINT=SECONDS holds every write here, its temporary file complete but
    # not yet renamed, as a multi-GB checkpoint would be; tests kill a stopping job at this point.
    delay = float(os.environ.get("GLOW_DIST_INJECT_SLOW_CHECKPOINT", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def save_verified(state: dict, path: str | Path) -> Path:
    """torch.save `state` to `path` atomically, then its sha256 sidecar (hashed from what reached the file)."""
    path = Path(path)
    sidecar(path).unlink(missing_ok=True)  # re-saving: it must not look complete until rewritten
    write_atomic(path, lambda f: torch.save(state, f), before_rename=_drill_slow_write)
    digest = sha256_file(path)
    write_atomic(sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    fsync_dir(path.parent)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (file and checksum sidecar present), oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and sidecar(p).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep: int) -> Path:
    """Write `state` as checkpoints/ckpt-<step>.pt atomically with its sha256, then keep only the last `keep`.

    `keep <= 0` keeps every checkpoint. Returns the path of the new checkpoint.
    """
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_verified(state, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != path:  # never the one just written, whatever the step numbers say
                sidecar(old).unlink(missing_ok=True)  # sidecar first: a half-deleted pair is never "complete"
                old.unlink(missing_ok=True)
    return path


def recorded_sha256(path: str | Path) -> str:
    """The digest a checkpoint's sidecar records ("" when the sidecar is empty)."""
    fields = sidecar(path).read_text().split()
    return fields[0] if fields else ""


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless `path` exists and matches its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not sidecar(path).is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar(path).name}; it was not completely "
                              "written")
    expected, actual = recorded_sha256(path), sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} fails its checksum (sha256 {actual[:12]}..., expected {expected[:12]}...): "
            "the file is corrupt or was modified; delete it to resume from the previous one"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify `path` against its checksum, then load it; raise CheckpointError naming the file on any failure."""
    verify_checkpoint(path)
    try:
        # weights_only=False: checkpoints of earlier versions hold numpy/python RNG states.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {e}") from e


def model_weights(state: dict, which: str = "ema") -> dict:
    """A Glow state dict from a checkpoint's state: its `ema` weights (without the update count) or raw `model`."""
    return {k: v for k, v in state[which].items() if k != EMA_UPDATES_KEY}


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """Newest checkpoint that verifies and loads, walking back past broken ones; None when none is usable."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            print(f"[checkpoint] skipping {path.name}: {e}", flush=True)
    return None


def open_checkpoint(path_or_run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """A checkpoint file, or the newest valid checkpoint of a run directory; CheckpointError names what is
    missing. (Model URIs, `models:/NAME/V`, are glow_dist.inference.loading's business.)"""
    path = Path(path_or_run_dir)
    if path.is_dir():
        found = load_latest(path, map_location)
        if found is None:
            raise CheckpointError(f"no valid checkpoint under {checkpoint_dir(path)}; pass a ckpt-*.pt file or a "
                                  "run directory that a finished training step wrote to")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a ckpt-*.pt file, a run directory or a "
                              "model URI (models:/NAME/VERSION, runs:/RUN_ID/model)")
    return path, load_checkpoint(path, map_location)
