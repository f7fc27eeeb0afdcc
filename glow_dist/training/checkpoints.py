"""Checkpoint management for a training run: where it resumes from, what it rolls back to, and writing checkpoints.

    manager = CheckpointManager(cfg, state, main=dist.is_main())
    loaded = manager.restore()              # train.resume: auto | never | a path; every rank gets rank 0's state
    manager.save(step, report)              # rank 0 snapshots the state; a background thread writes it
    manager.poll(report)                    # after every step: a finished write is reported, a failed one raised
    manager.wait(report)                    # the write in flight finished (before a rollback, at the end)
    path = manager.save_verified(step, report)   # the stop checkpoint: local only, read back from the disk
    loaded = manager.rollback()             # after too many non-finite steps: the newest good checkpoint

Periodic and final checkpoints are asynchronous (`train.async_checkpoint`, default true): rank 0 copies the state
into host memory (glow_dist/training/background.py) and training goes on while a thread serializes, hashes and
writes it. At most one write is in flight: a checkpoint step that comes while the previous write runs waits for it,
and says how long. A write's error (a full disk) is raised on the training thread at the next step. The stop
checkpoint supersedes the write in flight (it is given up; if it had failed, the failure is reported and the stop
checkpoint written all the same), then writes the stop step's state directly and verifies it.

Only rank 0 reads and writes files; the others get what it read through broadcasts, so every collective here is
made by every rank. The file format is glow_dist/checkpoint.py's.
"""
from __future__ import annotations

import time
from pathlib import Path
from threading import Event

from glow_dist.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_path,
    gib,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    verify_checkpoint,
)
from glow_dist.config import Config, ConfigError
from glow_dist.distributed import gateway as dist
from glow_dist.files import Superseded
from glow_dist.tracking.reporter import NullReporter
from glow_dist.training.background import BackgroundWrite, HostSnapshot
from glow_dist.training.checkpoint_folder import adopt, remove_leftovers, set_aside_past
from glow_dist.training.state import Loaded, TrainingState


class CheckpointManager:
    def __init__(self, cfg: Config, state: TrainingState, main: bool):
        self.cfg, self.state, self.main = cfg, state, main
        self.run_dir = Path(cfg.train.run_dir)
        self.snapshot = HostSnapshot()
        self._in_flight: tuple[BackgroundWrite, dict, bool] | None = None   # the write, its state, upload

    def find_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint `train.resume` asks for (read on rank 0 only), or None for a fresh start. First the
        folder is tidied (what killed writes left is removed); a resume from a checkpoint older than the folder's
        newest sets the newer ones aside (glow_dist/training/checkpoint_folder.py). Both are printed."""
        self._remove_leftovers()
        mode = self.cfg.train.resume
        if mode == "never":
            if list_checkpoints(self.run_dir):
                raise ConfigError(f"train.resume=never but {self.run_dir} already has checkpoints; starting over "
                                  "would rotate them away. Use train.resume=auto, or another train.run_dir")
            return None
        if mode == "auto":
            found = load_latest(self.run_dir)
        else:
            path = Path(mode)
            if not path.is_file():
                raise CheckpointError(f"train.resume={mode}: no such checkpoint file; use auto, never or a ckpt-*.pt "
                                      "path")
            found = path, load_checkpoint(path)
        if found is not None:
            self._set_aside_past(*found)
        return found

    def _remove_leftovers(self) -> None:
        removed, live = remove_leftovers(self.run_dir)
        if removed:
            files = ", ".join(f"{p.name} ({gib(size)}, {why})" for p, size, why in removed)
            print(f"[checkpoint] removed what interrupted checkpoint writes left in {checkpoint_dir(self.run_dir)}: "
                  f"{files}; {gib(sum(size for _, size, _ in removed))} freed", flush=True)
        for path, owner in live:
            print(f"[checkpoint] left {path}: it is still being written by {owner}; is another job writing to "
                  f"{self.run_dir}?", flush=True)

    def _set_aside_past(self, path: Path, saved: dict) -> None:
        step = saved.get("position", {}).get("step") if isinstance(saved.get("position"), dict) else None
        if not isinstance(step, int):
            return   # not a glow-dist checkpoint: TrainingState.load says so
        moved = set_aside_past(self.run_dir, path, step)
        if moved is not None:
            folder, past = moved
            print(f"[checkpoint] resuming from step {step} ({path}) starts a new line of training: the checkpoints "
                  f"of later steps ({', '.join(p.name for p in past)}) belong to the line abandoned there and were "
                  f"moved to {folder}, so that train.resume=auto and the rotation do not return to them (nothing "
                  "deleted: resume one with train.resume=PATH, or delete the folder)", flush=True)
        try:
            adopt(self.run_dir, path, step)
        except OSError as e:   # another filesystem: the line's first checkpoint will be its start in this folder
            print(f"[checkpoint] {path} could not be linked into {checkpoint_dir(self.run_dir)} ({e}); until this "
                  "run's first checkpoint, train.resume=auto would not find the step it started from", flush=True)

    def load_local(self, found: tuple[Path, dict] | None) -> Loaded | None:
        """Load what rank 0 found into this process (no collective)."""
        if found is None:
            return None
        path, saved = found
        return self.state.load(saved, str(path))

    def _load_everywhere(self, found: tuple[Path, dict] | None) -> Loaded | None:
        """Rank 0 loads `found`; every rank gets the tensors and what the checkpoint says (None on a fresh start)."""
        loaded = dist.broadcast_object(self.load_local(found) if self.main else None)
        if loaded is not None:
            self.state.broadcast()
            self.state.ema.updates = loaded.ema_updates   # rank 0's count; the weights came with the broadcast
        return loaded

    def restore(self) -> Loaded | None:
        """The checkpoint `train.resume` names, on every rank; None for a fresh start."""
        return self._load_everywhere(self.find_resume() if self.main else None)

    def rollback(self, report: NullReporter) -> Loaded:
        """The newest checkpoint that verifies, on every rank (after too many consecutive non-finite steps)."""
        self.wait(report)
        loaded = self._load_everywhere(load_latest(self.run_dir) if self.main else None)
        if loaded is None:
            raise RuntimeError(f"{self.state.position.consecutive_skips} consecutive steps had a non-finite loss or "
                               f"gradient and {self.run_dir} has no checkpoint to roll back to; lower optim.lr, raise "
                               "optim.warmup_steps, or checkpoint more often (train.checkpoint_every)")
        return loaded

    def save(self, step: int, report: NullReporter, world_size: int, upload: bool = True) -> None:
        """Rank 0 checkpoints the state as of `step`: snapshot and background write (train.async_checkpoint), or
        written before this returns. Reported to the reporter (uploaded) once written. Nothing elsewhere."""
        if not self.main:
            return
        if not self.cfg.train.async_checkpoint:
            state = self.state.checkpoint(report.run_id, world_size)
            report.checkpoint_saved(self._write(state, step), state, upload)
            return
        waited = self.wait(report)
        if waited > 0.05:
            report.message(f"[checkpoint] step {step} waited {waited:.1f} s for the previous checkpoint's write: "
                           "the disk takes longer than train.checkpoint_every steps")
        state = self.snapshot.take(self.state.checkpoint(report.run_id, world_size))
        self._in_flight = BackgroundWrite(step, lambda cancel: self._write(state, step, cancel=cancel)), state, upload

    def poll(self, report: NullReporter) -> None:
        """After a step: a finished background write is reported, a failed one raised here (CheckpointWriteError
        for a full disk), never lost."""
        if self._in_flight is not None and self._in_flight[0].done():
            self.wait(report)

    def wait(self, report: NullReporter, upload: bool = True) -> float:
        """Until the write in flight is on disk (reported; uploaded unless `upload` is false) or has failed
        (raised); returns the seconds waited."""
        if self._in_flight is None:
            return 0.0
        (write, state, wanted), self._in_flight = self._in_flight, None
        t0 = time.perf_counter()
        path = write.join()
        waited = time.perf_counter() - t0
        report.checkpoint_saved(path, state, wanted and upload)
        return waited

    def _write(self, state: dict, step: int, read_back: bool = False, cancel: Event | None = None) -> Path:
        return save_checkpoint(state, self.run_dir, step, self.cfg.train.keep_checkpoints, read_back, cancel)

    def save_verified(self, step: int, report: NullReporter, world_size: int) -> Path | None:
        """The stop checkpoint. A write in flight of an earlier step is superseded (given up at its next block; if
        it was already complete it counts as the previous checkpoint); one that failed (an I/O error) is reported
        and does not stop this one. Then the state of `step` is written from the live tensors (training has
        stopped), local only (an upload of GBs would outlast the scheduler's grace), and read back from the disk
        against its sha256 while it is written, so the stop is reported only once the file is known good. Rank 0;
        None elsewhere."""
        if not self.main:
            return None
        in_flight = self._in_flight[0].step if self._in_flight is not None else None
        if in_flight is not None and in_flight != step:
            self._in_flight[0].supersede()   # the stop step's checkpoint replaces it; no need to finish it
        path = checkpoint_path(self.run_dir, step)
        try:
            self.wait(report, upload=False)
        except Superseded:
            report.message(f"[checkpoint] the write of step {in_flight} was given up for the stop checkpoint of "
                           f"step {step}")
        except Exception as e:   # noqa: BLE001  (whatever became of it, the stop checkpoint is attempted)
            report.message(f"[checkpoint] the write of step {in_flight} had failed: {e}. Writing the stop "
                           f"checkpoint of step {step} all the same")
            report.tags({"stop.failed_write": f"step {in_flight}: {e}"})
        else:
            if in_flight == step:   # the write just finished is the stop step's own checkpoint
                verify_checkpoint(path)
                return path
        state = self.state.checkpoint(report.run_id, world_size)
        self._write(state, step, read_back=True)   # read back while written: verified when it is in place
        report.checkpoint_saved(path, state, upload=False)
        return path
