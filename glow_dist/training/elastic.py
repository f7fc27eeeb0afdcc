"""Elastic training (`dist.elastic=true`, Horovod elastic over Gloo): the same start-up and loop as a plain run,
wrapped so that workers may be lost and added while the job runs.

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script launch/discover_hosts.sh --gloo \\
        glow-dist train --config configs/digits.yaml dist.elastic=true

Every `dist.commit_every` steps the weights, optimizer, EMA and position are committed to host memory. When a worker
dies the others roll back to the last commit, Horovod restarts with the smaller world, data sharding is rebuilt for
it and training goes on; a worker that (re)joins gets rank 0's state. The position within the epoch is mapped
proportionally (batch b of B becomes b * B' // B), so an epoch still covers about one pass over the data.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from glow_dist.config import ConfigError
from glow_dist.data.manifest import train_batches
from glow_dist.distributed import gateway as dist
from glow_dist.distributed.elastic import elastic_launched, elastic_run, elastic_state
from glow_dist.training.loop import Run, TrainingLoop
from glow_dist.training.state import Position
from glow_dist.training.stop import StopSignal


class ElasticTraining:
    def __init__(self, trainer: Run):
        """No collective here: a worker joining a running job gets everything from the state's sync, the first
        collective it makes; rank 0 of a starting job reads the checkpoint that sync then broadcasts."""
        if not elastic_launched():
            raise ConfigError("dist.elastic=true needs an elastic launch: horovodrun --host-discovery-script SCRIPT "
                              "--min-np N --max-np M --gloo ... (see launch/discover_hosts.sh)")
        self.t = t = trainer
        loaded = t.checkpoints.load_local(t.checkpoints.find_resume()) if dist.is_main() else None
        position = Position() if loaded is None else loaded.position
        batches = t.train_data.batches_per_epoch if loaded is None else \
            train_batches(t.train_data.total, loaded.world_size, t.cfg.train.batch_size)
        self.state = elastic_state(
            t.state.model, t.state.optimizer, t.state.ema.model, position=asdict(position), world=t.world,
            batches_per_epoch=batches, actnorm_done=loaded is not None, run_id=loaded and loaded.run_id,
            resumed=loaded and loaded.path, ema_updates=t.state.ema.updates)
        self.state.register_reset_callbacks([self._on_reset])

    def fit(self, stop: StopSignal) -> dict[str, float]:
        return elastic_run(self._run)(self.state, stop)

    def _run(self, state: Any, stop: StopSignal) -> dict[str, float]:
        """The training under Horovod elastic; `state` is self.state (Horovod's wrapper syncs and restores it)."""
        t, fresh = self.t, not self.state.actnorm_done
        t.state.position = Position(**state.position).rescaled(state.batches_per_epoch,
                                                                t.train_data.batches_per_epoch)
        t.state.position = t.state.position.resumable(t.train_data.batches_per_epoch)
        t.state.ema.updates = state.ema_updates  # the EMA weights were restored and synced by Horovod; the count here
        if fresh:  # data-dependent init once, before the first commit
            t.init_actnorm()
            state.actnorm_done = True
        t.start(state.run_id, state.resumed, fresh=fresh, elastic=True)  # the reporter is on this world's rank 0
        if state.world != t.world:
            t.report.message(f"world size {state.world} -> {t.world} at step {t.state.position.step}: data "
                             f"resharded, epoch {t.state.position.epoch} goes on at batch "
                             f"{t.state.position.batch_in_epoch}/{t.train_data.batches_per_epoch}")
        state.run_id = dist.broadcast_object(t.report.run_id)  # so any survivor can carry the run on
        t.report.metrics({"world_size": float(t.world)}, t.state.position.step)
        self._commit()
        return TrainingLoop(t, after_step=self._after_step).run(stop)

    def _on_reset(self) -> None:
        """After Horovod restarted with a new world, before rank 0's state is broadcast."""
        dist.reset_gradient_hooks(self.t.state.optimizer)  # a step broken by the lost worker left handles behind
        self.t.adopt_world()  # rank, world, data sharding, the per-rank step

    def _after_step(self) -> None:
        if self.t.state.position.step % self.t.cfg.dist.commit_every == 0:
            self._commit()

    def _commit(self) -> None:
        """The state to return to when a worker is lost; raises HostsUpdatedInterrupt on a host change."""
        state, t = self.state, self.t
        state.position, state.world = asdict(t.state.position), t.world
        state.ema_updates = t.state.ema.updates
        state.batches_per_epoch = t.train_data.batches_per_epoch
        state.commit()
