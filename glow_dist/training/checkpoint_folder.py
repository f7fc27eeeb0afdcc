"""The checkpoint folder of a run when training starts: what interrupted writes left is removed, and a resume from an
older checkpoint sets the newer ones aside. Rank 0 only, before anything is written (CheckpointManager.find_resume).

    removed = remove_leftovers(run_dir)                # [(file, bytes, why)]: printed by the caller
    moved = set_aside_past(run_dir, resumed_path, 500)  # the folder they went to, and the checkpoints moved
    linked = adopt(run_dir, resumed_path, 500)          # a resumed file from elsewhere, hard-linked in

Leftovers are files of this folder's own patterns only: `.tmp-ckpt-<step>.pt...` temporary files whose writer is
gone (each is locked by its writer until its rename: glow_dist/files.py, live_writer), `ckpt-<step>.pt` files without
a sidecar (never completed), sidecars without their checkpoint, and two-line sidecars of a re-save cut short (cut to
the line the file matches). A file a live writer still owns is left and named.

A resume from a checkpoint older than the newest of the folder starts a new line of history there. The checkpoints
of later steps belong to the abandoned line; left in place, `train.resume=auto` would return to them at the next
requeue, and rotation (by step number) would keep them and delete the new line's. They are moved, with their
sidecars, into `checkpoints/abandoned-after-step-<step>-<UTC time>/`: nothing is deleted, and any of them can still
be resumed with `train.resume=PATH`. A resumed file from outside the folder is hard-linked into it (no copy; not
across filesystems), so that a job stopped before its first checkpoint resumes the new line with `auto` too.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from glow_dist.checkpoint import checkpoint_dir, recorded_digests, sidecar
from glow_dist.files import fsync_dir, live_writer, sha256_file, temporary_target, write_atomic

_CHECKPOINT = re.compile(r"^ckpt-(\d{8})\.pt$")
_SIDECAR = re.compile(r"^(ckpt-\d{8}\.pt)\.sha256$")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def remove_leftovers(run_dir: str | Path) -> tuple[list[tuple[Path, int, str]], list[tuple[Path, str]]]:
    """Remove what interrupted checkpoint writes left in the run's checkpoint folder. Returns (removed: file, bytes,
    why) and (left alone: file, who still writes it)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return [], []
    entries = sorted(directory.iterdir())
    removed: list[tuple[Path, int, str]] = []
    live: list[tuple[Path, str]] = []
    busy: set[str] = set()   # checkpoint names a live writer is writing: their files are its business
    for path in entries:
        target = temporary_target(path.name)
        if target is None or not (_CHECKPOINT.match(target) or _SIDECAR.match(target)):
            continue
        owner = live_writer(path)
        if owner is not None:
            live.append((path, owner))
            busy.add(target.removesuffix(".sha256"))
            continue
        size = _size(path)
        path.unlink(missing_ok=True)
        removed.append((path, size, "a write cut short"))
    for path in entries:
        if not path.exists():
            continue
        if _CHECKPOINT.match(path.name) and path.name not in busy and path.is_file() and not sidecar(path).exists():
            size = _size(path)
            path.unlink(missing_ok=True)
            removed.append((path, size, f"never completed: no {sidecar(path).name}"))
        elif (m := _SIDECAR.match(path.name)) and m.group(1) not in busy:
            checkpoint = directory / m.group(1)
            if not checkpoint.exists() and path.is_file():
                removed.append((path, _size(path), f"the checksum of a missing {checkpoint.name}"))
                path.unlink(missing_ok=True)
            elif checkpoint.is_file() and len(digests := recorded_digests(checkpoint)) > 1 and \
                    (actual := sha256_file(checkpoint)) in digests:   # a re-save cut short: the line that holds
                write_atomic(path, lambda f, d=actual, n=checkpoint.name: f.write(f"{d}  {n}\n".encode()))
    if removed:
        fsync_dir(directory)
    return removed, live


def set_aside_past(run_dir: str | Path, resumed: Path, step: int) -> tuple[Path, list[Path]] | None:
    """Move the checkpoints of the run's folder of steps `step` and later (other than `resumed` itself), with their
    sidecars and cached directions, into a new folder `abandoned-after-step-<step>-<time>`. Returns (that folder,
    the checkpoints moved), or None when there were none."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    resumed = resumed.resolve()
    past = sorted(p for p in directory.iterdir() if (m := _CHECKPOINT.match(p.name)) and int(m.group(1)) >= step
                  and p.is_file() and p.resolve() != resumed)
    if not past:
        return None
    folder = directory / f"abandoned-after-step-{step:08d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    while folder.exists():   # a second resume within the same second
        folder = folder.with_name(folder.name + "-1")
    folder.mkdir()
    for checkpoint in past:
        # The sidecar copied, the checkpoint moved, then the sidecar removed: whenever this is cut short, the
        # checkpoint is complete in one of the two folders (remove_leftovers deletes a sidecar left alone).
        if sidecar(checkpoint).exists():
            recorded = sidecar(checkpoint).read_bytes()
            write_atomic(folder / sidecar(checkpoint).name, lambda f, b=recorded: f.write(b))
            fsync_dir(folder)
        checkpoint.rename(folder / checkpoint.name)
        sidecar(checkpoint).unlink(missing_ok=True)
        directions = checkpoint.with_name(checkpoint.name + ".directions")
        if directions.is_dir():
            directions.rename(folder / directions.name)
    fsync_dir(folder)
    fsync_dir(directory)
    return folder, past


def adopt(run_dir: str | Path, resumed: Path, step: int) -> Path | None:
    """Hard-link `resumed` (a checkpoint from outside the run's folder) and its sidecar into the folder as the
    checkpoint of `step`; None when it is inside already, the step is taken, or no link can be made (another
    filesystem: OSError is left to the caller to say)."""
    directory = checkpoint_dir(run_dir)
    target = directory / f"ckpt-{step:08d}.pt"
    if resumed.resolve().parent == directory.resolve() or target.exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    recorded = sidecar(resumed).read_bytes().replace(resumed.name.encode(), target.name.encode())
    os.link(resumed, target)
    try:
        write_atomic(sidecar(target), lambda f: f.write(recorded))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return target
