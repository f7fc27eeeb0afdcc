"""What a checkpoint holds: the model, its optimizer and EMA, and where training stands.

    state = TrainingState(cfg, model, optimizer, ema)
    saved = state.checkpoint(run_id="...", world_size=8)      # the dict glow_dist.checkpoint writes
    info = state.load(saved, source="ckpt-00001200.pt")      # into this process; checks the architecture

A checkpoint is {"model", "ema", "optimizer", "position", "config", "mlflow_run_id", "world_size"}: tensors, plain
numbers, strings and dicts of them. (Checkpoints before this layout also hold an "rng" entry, which nothing reads: the
dequantization noise and the data order are functions of (seed, step, rank), not of a global RNG.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch

from glow_dist.checkpoint import CheckpointError, check_weights, model_weights, require_entries
from glow_dist.config import Config, ConfigError, architecture_differences, from_dict, to_dict
from glow_dist.distributed import gateway as dist
from glow_dist.model import Glow
from glow_dist.training.ema import EMA


@dataclass
class Position:
    """Where training stands; with the weights, what a checkpoint restores."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    lr_scale: float = 1.0         # multiplied by optim.rollback_lr_factor at every rollback
    rollbacks: int = 0

    def advance(self, skipped: bool) -> None:
        """One step taken (or skipped: a non-finite loss or gradient on some rank)."""
        self.step += 1
        self.batch_in_epoch += 1
        self.skipped_steps += int(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0

    def roll_epoch(self, batches_per_epoch: int) -> None:
        """After the last batch of an epoch: the start of the next one."""
        if self.batch_in_epoch >= batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def resumable(self, batches_per_epoch: int) -> Position:
        """This position as a start: a checkpoint taken after the last batch of an epoch resumes at the start of the
        next one, and a run of skipped steps is not carried over."""
        p = replace(self, consecutive_skips=0)
        p.roll_epoch(batches_per_epoch)
        return p

    def rescaled(self, old_batches_per_epoch: int, new_batches_per_epoch: int) -> Position:
        """Elastic: the position within the epoch mapped to a world with another epoch length (batch b of B becomes
        b * B' // B), so an epoch still covers about one pass over the data."""
        if old_batches_per_epoch == new_batches_per_epoch:
            return replace(self)
        return replace(self, batch_in_epoch=self.batch_in_epoch * new_batches_per_epoch // old_batches_per_epoch)


class Loaded(NamedTuple):
    """What a checkpoint says beside its tensors."""
    position: Position
    run_id: str | None
    path: str
    world_size: int
    ema_updates: int


class TrainingState:
    def __init__(self, cfg: Config, model: Glow, optimizer: torch.optim.Optimizer, ema: EMA):
        self.cfg, self.model, self.optimizer, self.ema = cfg, model, optimizer, ema
        self.position = Position()

    def checkpoint(self, run_id: str | None, world_size: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": asdict(self.position),
            "config": to_dict(self.cfg),
            "mlflow_run_id": run_id,
            "world_size": world_size,
        }

    def load(self, state: dict, source: str) -> Loaded:
        """Load a checkpoint's weights, EMA and optimizer into this process (its position is returned, not set: the
        caller decides how it resumes). Refused with the differing keys when it holds another architecture, and
        with the entry named when one is missing or does not fit (CheckpointError), before anything is loaded."""
        require_entries(state, source, "config", "model", "ema", "optimizer", "position")
        changed = architecture_differences(from_dict(state["config"], f"{source} (saved config)"), self.cfg)
        if changed:
            raise ConfigError(f"{source} was trained with a different model ({', '.join(changed)}); use its config "
                              "or a new run_dir")
        check_weights(self.model, state["model"], f"{source} (model weights)")
        check_weights(self.ema.model, model_weights(state, "ema"), f"{source} (EMA weights)")
        try:
            position = Position(**state["position"])
        except TypeError as e:
            raise CheckpointError(f"checkpoint {source}: its position entry does not fit ({e})") from None
        self.model.load_state_dict(state["model"])
        # A checkpoint from before the EMA warm-up has no update count: it gets the optimizer steps it took, the
        # count an unbroken run would have reached (see glow_dist/training/ema.py).
        self.ema.load_state_dict(state["ema"], default_updates=position.step - position.skipped_steps)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {source}: its optimizer entry does not fit this optimizer "
                                  f"(optim.name and the model must match the run's): {e}") from None
        return Loaded(position, state.get("mlflow_run_id"), source, state.get("world_size", 1), self.ema.updates)

    def broadcast(self) -> None:
        """Every rank takes rank 0's weights, optimizer state and EMA copy."""
        dist.broadcast_training_state(self.model, self.optimizer, self.ema.model)
