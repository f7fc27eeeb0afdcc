"""The checkpoint file format: atomic, checksummed files with keep-last-k rotation.

Layout under a run directory:

    run_dir/checkpoints/ckpt-00001200.pt          torch.save of a state dict
    run_dir/checkpoints/ckpt-00001200.pt.sha256   "<hex digest>  ckpt-00001200.pt" (sha256sum format)

A checkpoint counts only when its file matches a digest its sidecar records. Both are moved into place with
os.replace, the sidecar first: a process killed mid-write leaves at most a `.tmp-*` file that is never picked up (and
that the next training start removes: glow_dist/training/checkpoint_folder.py). Re-saving a step that already has a
checkpoint (a finished job run again, an elastic reset, a resume from an older file) never leaves the step without
one: the sidecar first lists the old file's digest and the new one's, then the new file replaces the old in one
rename, then the sidecar is cut to the new digest; whenever the process dies, the file in place matches a line of its
sidecar (`sha256sum -c` reports the other line of such a two-line sidecar as failed; the next start trims it).
The file is written in one pass: its sha256 is computed from the bytes as they go to the disk (glow_dist/files.py,
HashingWriter), never read back (but for the stop checkpoint, read back from the disk as it is written), and the zip
records' own CRC32 is not computed (the sha256 covers every byte; torch.load does not need it).

What a state holds is the trainer's business (glow_dist/training/state.py); this module only stores, verifies and
finds it. Only rank 0 saves.

Loading never runs code from the file: a checksum proves only that the file is the one its writer meant, and anyone
who can write a checkpoint can write its sidecar. So it is torch.load(weights_only=True), which builds tensors, numbers,
strings and containers and refuses every other global the pickle names; checkpoints of earlier versions add numpy
arrays (their RNG state), allowed by name (glow_dist/safe_pickle.py) and said once in the log.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
from pathlib import Path
from threading import Event

import torch

from glow_dist.files import Superseded, fsync_dir, sha256_file, write_atomic, write_hashed
from glow_dist.safe_pickle import numpy_array_globals

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
EMA_UPDATES_KEY = "ema_updates"   # in a state's "ema" entry: the EMA's update count, beside its weights


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, fails its checksum, is refused as unsafe, lacks an entry or does
    not fit its model; the message names the file and what is wrong."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (the disk is full, an I/O error): its partial file is removed and the
    previous checkpoints are untouched. Training stops with exit status 74 (EX_IOERR), not a config or input error."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:08d}.pt"


def sidecar(path: str | Path) -> Path:
    """The sha256 file beside a checkpoint (or any file saved with `save_verified`)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _drill_slow_write(cancel: Event | None) -> None:
    # Fault drill: GLOW_DIST_INJECT_SLOW_CHECKPOINT=SECONDS holds every write here, its temporary file complete but
    # not yet renamed (its sidecar already lists it, and the old file's digest on a re-save), as a multi-GB
    # checkpoint would be; tests kill a stopping job at this point. A write that is superseded meanwhile (`cancel`)
    # stops holding at once, as a real one would at its next block.
    delay = float(os.environ.get("GLOW_DIST_INJECT_SLOW_CHECKPOINT", "0") or 0)
    if delay > 0:
        (cancel or Event()).wait(delay)


def state_nbytes(state: object) -> int:
    """The bytes of every tensor in a (nested) state: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def _save(state: dict, f: object) -> None:
    # The zip records' CRC32 is a second pass over every byte; the sha256 computed while writing covers them.
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        torch.save(state, f)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def write_error(path: Path, error: OSError, needed: int, keep: int = 1) -> CheckpointWriteError:
    """The error for a checkpoint write that failed: where, why, and how much room it needs."""
    directory = path.parent
    free = shutil.disk_usage(directory).free if directory.is_dir() else 0
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        room = f"about {gib(needed)} per checkpoint" + (f", {gib(needed * (keep + 1))} to write one while "
                                                        f"keeping {keep} (train.keep_checkpoints)" if keep > 0 else "")
        return CheckpointWriteError(
            f"checkpoint {path.name} could not be written: the disk of {directory} is full ({gib(free)} free; it "
            f"needs {room}). The partial file was removed and the previous checkpoints are intact. Free space there "
            "or set train.run_dir to a larger disk, then run the same command again to resume")
    return CheckpointWriteError(f"checkpoint {path.name} could not be written to {directory}: {error}. The partial "
                                "file was removed and the previous checkpoints are intact; check the disk, then run "
                                "the same command again to resume")


def recorded_digests(path: str | Path) -> list[str]:
    """The digests a checkpoint's sidecar records: one, or two in the middle of a re-save (old, new); [] without
    a sidecar."""
    try:
        lines = sidecar(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in lines if line.split()]


def _write_sidecar(path: Path, digests: list[str]) -> None:
    write_atomic(sidecar(path), lambda f: f.write("".join(f"{d}  {path.name}\n" for d in digests).encode()))
    fsync_dir(path.parent)


def save_verified(state: dict, path: str | Path, keep: int = 1, read_back: bool = False,
                  cancel: Event | None = None) -> Path:
    """torch.save `state` to `path` atomically with its sha256 sidecar, hashed from the bytes as they were written
    (one pass). An existing checkpoint at `path` stays one until the new file replaces it (the module doc).
    `read_back`: the file is also read back from the disk while it is written and must hash the same (the stop
    checkpoint). CheckpointWriteError when the disk refuses it (full, I/O error, a read-back that differs);
    Superseded when `cancel` is set meanwhile. Either way the file at `path`, if any, is as it was."""
    path = Path(path)
    previous = recorded_digests(path) if path.is_file() else []   # what the file in place may match
    if path.is_file() and not previous:
        path.unlink()   # never completed (no sidecar): not a checkpoint, and it must not meet the new sidecar
    switched = False

    def switch(digest: str) -> None:   # the new file is complete and fsynced, not yet renamed
        nonlocal switched
        switched = True
        _write_sidecar(path, [*dict.fromkeys([*previous, digest])])   # the old file and the new one both verify
        _drill_slow_write(cancel)
        if cancel is not None and cancel.is_set():
            raise Superseded(f"{path.name}: given up before its rename, a newer file replaces it")

    try:
        digest = write_hashed(path, lambda f: _save(state, f), before_rename=switch, read_back=read_back,
                              cancel=cancel)
    except BaseException as e:
        if switched:   # the new file never replaced the old one: the sidecar goes back to what it was
            with contextlib.suppress(OSError):
                if previous:
                    _write_sidecar(path, previous)
                else:
                    sidecar(path).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e, state_nbytes(state), keep) from e
        raise
    try:
        fsync_dir(path.parent)   # the rename is on disk
    except OSError as e:   # the new file is in place and verifies; whether it survives a crash is unsure
        raise CheckpointWriteError(f"checkpoint {path.name} was written to {path.parent}, but the disk failed to "
                                   f"record it ({e}); check the disk, then run the same command again to resume") \
            from e
    if previous:
        with contextlib.suppress(OSError):   # if not: two lines, the file matches the second; the next start trims
            _write_sidecar(path, [digest])
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (file and checksum sidecar present), oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and sidecar(p).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep: int, read_back: bool = False,
                    cancel: Event | None = None) -> Path:
    """Write `state` as checkpoints/ckpt-<step>.pt atomically with its sha256, then keep only the last `keep`.

    `keep <= 0` keeps every checkpoint; `read_back` and `cancel` as for save_verified. Returns the path of the new
    checkpoint.
    """
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_verified(state, path, keep, read_back, cancel)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != path:  # never the one just written, whatever the step numbers say
                sidecar(old).unlink(missing_ok=True)  # sidecar first: a half-deleted pair is never "complete"
                old.unlink(missing_ok=True)
    return path


def recorded_sha256(path: str | Path) -> str:
    """The digest a checkpoint's sidecar records ("" when the sidecar is empty); of a two-line sidecar (a re-save
    cut short), the one the file matches."""
    digests = recorded_digests(path)
    if len(digests) > 1:
        actual = sha256_file(path)
        return actual if actual in digests else digests[-1]
    return digests[0] if digests else ""


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless `path` exists and matches (a digest of) its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not sidecar(path).is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar(path).name}; it was not completely "
                              "written")
    expected, actual = recorded_digests(path), sha256_file(path)
    if actual not in expected:
        recorded = " or ".join(f"{e[:12]}..." for e in expected) or "nothing"
        raise CheckpointError(
            f"checkpoint {path} fails its checksum (sha256 {actual[:12]}..., expected {recorded}): "
            "the file is corrupt or was modified; delete it to resume from the previous one"
        )


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names something outside the allowlist: refused, none of it executed. Never skipped
    over like a broken file: a file planted in a run directory stops the command, it is not quietly passed by."""


_told_numpy = False   # the log says once per process that an earlier version's numpy arrays were read


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify `path` against its checksum, then load it without running any of its code (the module doc).
    UnsafeCheckpointError for a pickle that names anything outside the allowlist, CheckpointError naming the file on
    any other failure."""
    verify_checkpoint(path)
    allowed = numpy_array_globals()
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"checkpoint {path} refused: its pickle names {_refused_globals(path, e, allowed)}, which is not a "
            "tensor, number, string, container or numpy array. The file may be malicious; none of it was executed. "
            "Load checkpoints only from people you trust, and delete this one unless its author can explain it"
        ) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a glow-dist checkpoint (a dict "
                              "of model, ema, optimizer, position, config)")
    global _told_numpy
    if not _told_numpy and _holds_numpy(state):
        _told_numpy = True
        print(f"[checkpoint] {Path(path).name} is from an earlier glow-dist: its numpy arrays (the unused RNG state) "
              f"were read through an explicit allowlist ({', '.join(sorted(allowed))}); nothing else is allowed",
              flush=True)
    return state


def _refused_globals(path: str | Path, error: Exception, allowed: dict) -> str:
    """The globals outside the allowlist that a refused pickle names, for the message (torch's own reason when the
    pickle could not even be listed)."""
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:
        names = []
    if names:
        return ", ".join(names)
    reason = next((line for line in str(error).splitlines() if "WeightsUnpickler error" in line), str(error))
    return f"something the weights-only loader does not allow ({reason.strip()[:200]})"


def _holds_numpy(value: object) -> bool:
    import numpy as np

    if isinstance(value, dict):
        return any(_holds_numpy(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_numpy(v) for v in value)
    return isinstance(value, np.ndarray)


def require_entries(state: dict, path: str | Path, *names: str) -> None:
    """CheckpointError naming the first of `names` (each a dict entry: weights, config, position, ...) that `state`
    lacks or holds as something else."""
    for name in names:
        if name not in state:
            has = ", ".join(sorted(map(str, state))) or "nothing"
            raise CheckpointError(f"checkpoint {path} has no {name!r} entry (it has {has}); it was not written by "
                                  "glow-dist train (a logged MLflow model's weights.pt holds only the EMA weights)")
        if not isinstance(state[name], dict):
            raise CheckpointError(f"checkpoint {path}: its {name!r} entry is a {type(state[name]).__name__}, not a "
                                  "dict; it was not written by glow-dist")


def check_weights(module: torch.nn.Module, weights: dict, source: str) -> None:
    """CheckpointError naming the keys in which `weights` differ from `module`'s state dict (missing, unexpected, of
    another shape), where module.load_state_dict would fail with a page-long message or partway through."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [f"{k} {_shape(weights[k])} vs {tuple(v.shape)}" for k, v in own.items()
                if k in weights and _shape(weights[k]) != tuple(v.shape)]
    differences = [f"{what}: {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                               ("shape (checkpoint vs model)", reshaped)) if keys]
    if differences:
        raise CheckpointError(f"{source}: the weights do not fit the model ({'; '.join(differences)}); the "
                              "checkpoint's weights and config disagree, so it was not written by glow-dist train")


def _shape(value: object) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def model_weights(state: dict, which: str = "ema") -> dict:
    """A Glow state dict from a checkpoint's state: its `ema` weights (without the update count) or raw `model`."""
    return {k: v for k, v in state[which].items() if k != EMA_UPDATES_KEY}


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """Newest checkpoint that verifies and loads, walking back past broken ones (never past a refused one:
    UnsafeCheckpointError); None when none is usable."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except UnsafeCheckpointError:
            raise
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
