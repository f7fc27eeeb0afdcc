"""The training loop: steps over epochs until `train.steps`, with the periodic actions of a run.

After every step: bookkeeping of the position, the step's metrics averaged over ranks every `train.log_every`
steps, test bits/dim every `train.eval_every`, sample grids every `train.sample_every`, a checkpoint every
`train.checkpoint_every` (never in a run of skipped steps: a rollback should land before the trouble started).
A stop signal voted with the step ends the loop with a verified checkpoint; `train.max_consecutive_skips` skipped
steps in a row roll every rank back to the newest good checkpoint. At the end: the final evaluation, samples and
checkpoint. Every rank runs the same calls in the same order; rank-0-only effects go through the reporter.

Fault drills: GLOW_DIST_INJECT_SLOW_STEP=SECONDS adds that much to every step, so that the debug model runs as long
as a real one: the scheduler tests (tests/test_slurm.py) stop jobs mid-run at times the scheduler chooses.
GLOW_DIST_INJECT_STALL="STEP:RANK[:SECONDS][,...]" holds that rank before its collectives of that step (an hour by
default), as a hung data loader or GPU kernel would: the others wait in the all-reduce and the step watchdog
(`dist.hang_timeout`) must end the job (tests/test_faults.py).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from glow_dist.config import Config
from glow_dist.distributed import gateway as dist
from glow_dist.distributed.watchdog import StepWatchdog
from glow_dist.tracking.reporter import NullReporter
from glow_dist.training.checkpoints import CheckpointManager
from glow_dist.training.data_health import BadSampleMonitor
from glow_dist.training.optimizer import LearningRate
from glow_dist.training.state import TrainingState
from glow_dist.training.step import TrainStep, step_rank_drill
from glow_dist.training.stop import StopSignal


class Run(Protocol):
    """What the loop (and the elastic wrapper) work on: the trainer's components, rebuilt when the world changes."""
    cfg: Config
    world: int
    state: TrainingState
    schedule: LearningRate
    step: TrainStep
    checkpoints: CheckpointManager
    report: NullReporter
    watchdog: StepWatchdog
    rank: int
    train_data: Any     # glow_dist.data.Loader of the training split, for this rank
    test_data: Any
    data_health: BadSampleMonitor

    def log_evaluation(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]: ...
    def samples(self, step: int) -> None: ...
    def init_actnorm(self) -> None: ...
    def adopt_world(self) -> None: ...
    def start(self, run_id: str | None, resumed_from: str | None, fresh: bool, elastic: bool = False) -> None: ...


def injected_stalls() -> dict[tuple[int, int], float]:
    """GLOW_DIST_INJECT_STALL="STEP:RANK[:SECONDS][,...]": (step, rank) -> seconds that rank is held in that step."""
    return step_rank_drill("GLOW_DIST_INJECT_STALL", value="3600")


class Interval:
    """Train bits/dim and gradient norm summed on the device over a log interval (read back only when logged)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bpd: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float = 0.0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, bpd: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bpd, self.grad_norm, self.steps = self.bpd + bpd, self.grad_norm + grad_norm, self.steps + 1

    def metrics(self, steps: int, batch_size: int) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"bits_per_dim/train": float(self.bpd) / n, "grad_norm": float(self.grad_norm) / n,
                "images_per_sec": steps * batch_size / max(time.perf_counter() - self.t0, 1e-9)}


class TrainingLoop:
    def __init__(self, trainer: Run, after_step: Callable[[], None] | None = None):
        self.t = trainer
        self.after_step = after_step   # elastic: commit every dist.commit_every steps
        self._modes_recorded = False
        self._drill_step_seconds = float(os.environ.get("GLOW_DIST_INJECT_SLOW_STEP", "0") or 0)
        self._drill_stalls = injected_stalls()

    def run(self, stop: StopSignal) -> dict[str, float]:
        t, interval = self.t, Interval()
        while t.state.position.step < t.cfg.train.steps:
            pos = t.state.position
            # closing(): on a stop or rollback the loader's workers are shut down here, before the checkpoint.
            with contextlib.closing(t.train_data.epoch(pos.epoch, start_batch=pos.batch_in_epoch)) as batches:
                stopped_by = self._epoch(batches, stop, interval)
            if stopped_by is not None:
                return self._stop(stopped_by)
            t.state.position.roll_epoch(t.train_data.batches_per_epoch)
        return self._finish()

    def _epoch(self, batches: Iterator, stop: StopSignal, interval: Interval) -> str | None:
        """Steps over one epoch's batches; returns the stop reason when a stop was voted, else None."""
        t = self.t
        for images, labels in batches:
            pos = t.state.position
            t.schedule.apply(t.state.optimizer, pos.step, pos.lr_scale)
            if (pos.step, t.rank) in self._drill_stalls:
                time.sleep(self._drill_stalls[pos.step, t.rank])   # before its collectives: the others wait in them
            bpd, result = t.step(images, labels, pos.step, stop.requested)
            if self._drill_step_seconds > 0:
                time.sleep(self._drill_step_seconds)
            if not self._modes_recorded:  # known after the first step: its capture and every rank's mode
                t.report.tags(t.step.run_tags())
                self._modes_recorded = True
            pos.advance(result.skipped)
            t.watchdog.beat(pos.step)
            if not result.skipped:
                interval.add(bpd, result.grad_norm)
            t.report.step(pos.step)
            # A background checkpoint that finished is reported; one that failed raises. Not on a stop: the stop
            # checkpoint reports the write in flight, and is written whatever became of it.
            if not result.stop:
                t.checkpoints.poll(t.report)
            self._periodic(interval, stopping=result.stop)
            if result.stop:  # voted with the skip decision, so every rank stops after the same step
                return stop.name or "peer-signal"  # the signal reached another rank only
            if 0 < t.cfg.train.max_consecutive_skips <= pos.consecutive_skips:
                self._rollback()
                return None
            if self.after_step is not None:
                self.after_step()
            if pos.step >= t.cfg.train.steps:
                return None
        return None

    def _periodic(self, interval: Interval, stopping: bool = False) -> None:
        """Logging, evaluation, samples and the periodic checkpoint due after this step. On a step that voted a stop
        the periodic checkpoint is left to the stop checkpoint, which supersedes a write in flight instead of waiting
        for it (a slow disk would otherwise spend the scheduler's grace on a checkpoint about to be replaced)."""
        t, cfg = self.t, self.t.cfg.train
        pos = t.state.position
        if pos.step % cfg.log_every == 0:
            metrics = dist.allreduce_scalars(interval.metrics(cfg.log_every, cfg.batch_size))  # averaged over ranks
            metrics["images_per_sec"] *= t.world  # the job's throughput, not one rank's
            metrics.update(lr=t.schedule(pos.step - 1, pos.lr_scale), skipped_steps=float(pos.skipped_steps),
                           epoch=float(pos.epoch))
            t.report.metrics(metrics, pos.step)
            interval.reset()
            t.data_health.sync([t.train_data, t.test_data], t.report, pos.step)  # collective, like the metrics

        def due(every: int) -> bool:  # 0: only at the end (done by _finish)
            return every > 0 and pos.step % every == 0 and pos.step < cfg.steps

        if due(cfg.eval_every):
            t.log_evaluation(pos.step)
        if due(cfg.sample_every):
            t.samples(pos.step)
        if due(cfg.checkpoint_every) and pos.consecutive_skips == 0 and not stopping:
            with t.watchdog.busy():   # it may wait for the previous write
                t.checkpoints.save(pos.step, t.report, t.world)

    def _rollback(self) -> None:
        """Every rank returns to the newest good checkpoint, with the learning rate multiplied by
        optim.rollback_lr_factor."""
        t = self.t
        before = t.state.position
        with t.watchdog.busy():
            loaded = t.checkpoints.rollback(t.report)
        restored = loaded.position.resumable(t.train_data.batches_per_epoch)
        restored.lr_scale = before.lr_scale * t.cfg.optim.rollback_lr_factor
        restored.rollbacks, restored.skipped_steps = before.rollbacks + 1, before.skipped_steps
        t.state.position = restored
        t.report.message(f"{before.consecutive_skips} consecutive non-finite steps at step {before.step}: rolled "
                         f"back to {loaded.path} (step {restored.step}), learning rate x{restored.lr_scale:g}")
        t.report.metrics({"rollbacks": float(restored.rollbacks), "lr_scale": restored.lr_scale}, before.step)

    def _stop(self, reason: str) -> dict[str, float]:
        t, step = self.t, self.t.state.position.step
        t0 = time.perf_counter()
        with t.watchdog.busy():
            path = t.checkpoints.save_verified(step, t.report, t.world)
        t.report.stopped(reason, step, path, time.perf_counter() - t0)
        return {"step": float(step), "skipped_steps": float(t.state.position.skipped_steps), "stopped": 1.0}

    def _finish(self) -> dict[str, float]:
        t, pos = self.t, self.t.state.position
        test = t.log_evaluation(pos.step, {"skipped_steps": float(pos.skipped_steps)})
        t.data_health.sync([t.train_data, t.test_data], t.report, pos.step)
        t.samples(pos.step)
        with t.watchdog.busy():
            t.checkpoints.save(pos.step, t.report, t.world)
            t.checkpoints.wait(t.report)   # the final checkpoint is on disk before the run is reported done
        t.report.results(
            f"final test bits/dim {test['bits_per_dim/test_ema']:.4f} with the EMA weights ({t.state.ema.describe()}), "
            f"{test['bits_per_dim/test_raw']:.4f} with the raw weights, after {pos.step} steps "
            f"({pos.skipped_steps} skipped)")
        return {**test, "step": float(pos.step), "skipped_steps": float(pos.skipped_steps)}
