"""Checkpoint management for a training run: where it resumes from, what it rolls back to, and writing checkpoints.

    manager = CheckpointManager(cfg, state, main=dist.is_main())
    loaded = manager.restore()              # train.resume: auto | never | a path; every rank gets rank 0's state
    manager.save(step, report)              # rank 0 writes (atomic, sha256), the reporter uploads
    path = manager.save_verified(step, report)   # the stop checkpoint: local only, read back before it counts
    loaded = manager.rollback()             # after too many non-finite steps: the newest good checkpoint

Only rank 0 reads and writes files; the others get what it read through broadcasts, so every collective here is
made by every rank. The file format is glow_dist/checkpoint.py's.
"""
from __future__ import annotations

from pathlib import Path

from glow_dist.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    verify_checkpoint,
)
from glow_dist.config import Config, ConfigError
from glow_dist.distributed import gateway as dist
from glow_dist.tracking.reporter import NullReporter
from glow_dist.training.state import Loaded, TrainingState


class CheckpointManager:
    def __init__(self, cfg: Config, state: TrainingState, main: bool):
        self.cfg, self.state, self.main = cfg, state, main
        self.run_dir = Path(cfg.train.run_dir)

    def find_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint `train.resume` asks for (read on rank 0 only), or None for a fresh start."""
        mode = self.cfg.train.resume
        if mode == "never":
            if list_checkpoints(self.run_dir):
                raise ConfigError(f"train.resume=never but {self.run_dir} already has checkpoints; starting over "
                                  "would rotate them away. Use train.resume=auto, or another train.run_dir")
            return None
        if mode == "auto":
            return load_latest(self.run_dir)
        path = Path(mode)
        if not path.is_file():
            raise CheckpointError(f"train.resume={mode}: no such checkpoint file; use auto, never or a ckpt-*.pt path")
        return path, load_checkpoint(path)

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

    def rollback(self) -> Loaded:
        """The newest checkpoint that verifies, on every rank (after too many consecutive non-finite steps)."""
        loaded = self._load_everywhere(load_latest(self.run_dir) if self.main else None)
        if loaded is None:
            raise RuntimeError(f"{self.state.position.consecutive_skips} consecutive steps had a non-finite loss or "
                               f"gradient and {self.run_dir} has no checkpoint to roll back to; lower optim.lr, raise "
                               "optim.warmup_steps, or checkpoint more often (train.checkpoint_every)")
        return loaded

    def save(self, step: int, report: NullReporter, world_size: int, upload: bool = True) -> Path | None:
        """Rank 0 writes the state as the checkpoint of `step` and hands it to the reporter; None elsewhere."""
        if not self.main:
            return None
        state = self.state.checkpoint(report.run_id, world_size)
        path = save_checkpoint(state, self.run_dir, step, self.cfg.train.keep_checkpoints)
        report.checkpoint_saved(path, state, upload)
        return path

    def save_verified(self, step: int, report: NullReporter, world_size: int) -> Path | None:
        """The stop checkpoint: local only (an upload of GBs would outlast the scheduler's grace), and read back
        against its sha256, so the stop is reported only once the file is known good. Rank 0; None elsewhere."""
        path = self.save(step, report, world_size, upload=False)
        if path is not None:
            verify_checkpoint(checkpoint_path(self.run_dir, step))
        return path
