"""Training: Glow on WebDataset shards, as one process or as many ranks under horovodrun.

    glow-dist train --config configs/debug.yaml                                       # one process
    horovodrun -np 2 -H localhost:2 --gloo glow-dist train --config configs/digits.yaml
    horovodrun -np 40 --hostfile launch/hostfile.example glow-dist train --config configs/celeba_hq_256.yaml

The Trainer composes components built from the config, each in its own module of this package: the training state
and its checkpoints (state.py, checkpoints.py), the optimizer and its learning-rate schedule (optimizer.py), the step
(step.py, `runtime.step_mode`), the EMA (ema.py), evaluation and the sample-weight policy (evaluation.py), the loop
and its periodic actions (loop.py), elastic training as a wrapper around the same start-up and loop (elastic.py), and
stop signals (stop.py). Rank-0 effects go through one reporter (glow_dist/tracking/reporter.py).

Determinism: data order depends on (seed, epoch), dequantization noise on (seed, step, rank), so with
`train.deterministic=true` a run stopped and resumed from a checkpoint ends with the same weights as one that
never stopped.

Checkpoints: rank 0 copies the state into host memory at a checkpoint step and a background thread writes it while
training goes on (`train.async_checkpoint`; checkpoints.py). A write that fails (a full disk) stops the run at the
next step with CheckpointWriteError, exit status 74.

Reliability: a non-finite loss or gradient on any rank makes every rank skip the step; after
`train.max_consecutive_skips` in a row, every rank rolls back to the newest good checkpoint with the learning rate
multiplied by `optim.rollback_lr_factor`.

Data: before the first step the shards are checked against manifest.json (`data.verify`, data_health.py); a bad
sample is read as a substitute, named once and counted, and past `data.max_bad_samples` every rank stops at the same
step with one line (the MLflow run ends FAILED with a `failure.reason` tag).

Stopping: SIGTERM, SIGINT and SIGUSR1 make every rank stop after the same step: rank 0 writes a verified checkpoint,
the MLflow run ends KILLED with a `stop.reason` tag, and the process exits with `train.stop_exit_code` (0 by default).
Under horovodrun, launch with `glow-dist-horovodrun` (glow_dist/distributed/launcher.py) so the launcher waits for
that checkpoint instead of killing the ranks 5 s after the signal. A second SIGINT interrupts at once.

Lost peers: a collective that fails because another rank or host went silent, or no completed step for
`dist.hang_timeout` seconds (the step watchdog, glow_dist/distributed/watchdog.py), ends every rank with one line
naming who went silent and the newest verified checkpoint (training/faults.py), the MLflow run FAILED with
`failure.*` tags, and exit status 69 (rerun to resume).

Fault drill: GLOW_DIST_INJECT_NONFINITE="STEP:RANK[,STEP:RANK...]" makes that rank's loss NaN once at that step, to
check the collective skip and the rollback (tests use it; so can an operator on a new cluster).
"""
from __future__ import annotations

import os

import torch

from glow_dist.config import Config
from glow_dist.data import DataError, make_loader
from glow_dist.distributed import gateway as dist
from glow_dist.distributed.watchdog import StepWatchdog
from glow_dist.failures import EX_PEER_LOST, JobFailure, announce
from glow_dist.model import build_model, preprocess, resolved_runtime
from glow_dist.runtime import apply_tf32, device_memory_bytes
from glow_dist.tracking.reporter import NullReporter, RunFacts
from glow_dist.training.checkpoints import CheckpointManager
from glow_dist.training.data_health import BadSampleMonitor, verify_data
from glow_dist.training.elastic import ElasticTraining
from glow_dist.training.ema import EMA
from glow_dist.training.evaluation import Evaluator
from glow_dist.training.faults import PeerLoss, linger
from glow_dist.training.loop import TrainingLoop
from glow_dist.training.optimizer import LearningRate, make_optimizer
from glow_dist.training.state import TrainingState
from glow_dist.training.step import build_train_step, injected_faults, noise_generator
from glow_dist.training.stop import StopSignal


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        dist.init(cfg.dist.background_priority)
        self.device = dist.pin_device()
        # Every rank: no step for dist.hang_timeout ends the job with one line (elastic runs recover by themselves).
        self.watchdog = StepWatchdog(cfg.dist.hang_timeout, on_hang=self._on_hang, enabled=not cfg.dist.elastic)
        self.peer_loss = PeerLoss(cfg, self.watchdog.heartbeats)
        threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // dist.local_size())
        torch.set_num_threads(threads)  # N ranks on one host share its cores
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        apply_tf32(cfg.runtime.tf32, self.device)
        torch.manual_seed(cfg.train.seed)  # same initial weights everywhere; rank 0's are broadcast anyway
        # runtime.memory=auto: plain or checkpoint, from the plan's estimate and this rank's share of its device
        self.runtime, memory_note = resolved_runtime(cfg.runtime, cfg.model, cfg.train.batch_size,
                                                     device_memory_bytes(self.device, dist.local_size()))
        if memory_note:
            self._log_rank0(f"[memory] runtime.memory={self.runtime.memory} ({memory_note})")
        model = build_model(cfg.model, self.runtime).to(self.device)
        # Wrap before any state is loaded: Horovod's DistributedOptimizer is a new optimizer built from the param
        # groups, so state loaded into the unwrapped one would be silently dropped.
        optimizer = dist.distributed_optimizer(make_optimizer(cfg.optim, model), model, cfg.dist.fp16_allreduce)
        self.state = TrainingState(cfg, model, optimizer, EMA(model, cfg.optim.ema_decay))
        self.evaluator = Evaluator(cfg, model, self.state.ema)
        self.faults = injected_faults()
        self.report = NullReporter()
        # Before any rank reads a batch: the shards against the manifest, one local rank per node (collective).
        self.data_health = BadSampleMonitor(verify_data(cfg, self._log_rank0), cfg.data.max_bad_samples)
        self.checkpoints: CheckpointManager | None = None   # per world: adopt_world makes it
        self.adopt_world()

    def adopt_world(self) -> None:
        """Rank and world size, and what depends on them: data sharding, the step (its noise and injected faults
        are per rank), the learning-rate scaling, which rank writes checkpoints. Again after an elastic reset."""
        cfg, s = self.cfg, self.state
        self.rank, self.world = dist.rank(), dist.size()
        self.train_data, self.test_data = (
            make_loader(cfg.data, cfg.model, split, rank=self.rank, world_size=self.world,
                        batch_size=cfg.train.batch_size, device=self.device, seed=cfg.train.seed,
                        bad_samples=self.data_health.known)
            for split in ("train", "test"))
        self.schedule = LearningRate(cfg.optim, self.world)
        self.step = build_train_step(cfg, s.model, s.optimizer, s.ema, device=self.device, rank=self.rank,
                                     faults=self.faults, log=self._log_rank0, warn=self._log_every_rank)
        if self.checkpoints is not None:
            self.checkpoints.wait(self.report)   # the old world's write in flight, before its manager goes
        self.checkpoints = CheckpointManager(cfg, s, main=dist.is_main())

    def start(self, run_id: str | None, resumed_from: str | None, fresh: bool, elastic: bool = False) -> None:
        """Both start paths (plain and elastic) end here: rank 0's reporter opens the run with its tags, and a fresh
        run scores its initial weights and draws samples at step 0 (the UI's image slider opens there)."""
        hosts = dist.host_count()  # collective: every rank calls it
        self.report = self.report.for_rank(dist.is_main(), self.cfg, run_id, self.world, self.state.position.step)
        self.report.start(RunFacts(self.world, hosts, self.train_data.backend, self.train_data.decode, elastic,
                                   self.runtime.memory), resumed_from)
        self.report.message(self.train_data.describe())  # which backend and decoder actually run
        self.data_health.announce(self.report, self.state.position.step)
        if fresh and self.state.position.step == 0:
            self.log_evaluation(0)
            if self.cfg.train.sample_every > 0:
                self.samples(0)

    def fit(self, stop: StopSignal | None = None) -> dict[str, float]:
        """Train to train.steps, or until a stop signal; the MLflow run ends FINISHED, KILLED (a stop, with a
        `stop.reason` tag) or FAILED, never left RUNNING."""
        if stop is None:
            with StopSignal() as own:
                return self.fit(own)
        status, lost_peer = "FAILED", False
        try:
            result = ElasticTraining(self).fit(stop) if self.cfg.dist.elastic else self._fit(stop)
            status = "KILLED" if result.get("stopped") else "FINISHED"
            return result
        except DataError as e:
            self.report.failed(data_failure(e, self.state.position.step))   # the run ends FAILED, failure.* tags
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            self.report.stopped("SIGINT (second: no checkpoint)", self.state.position.step, None)
            raise
        except Exception as e:
            failure = self._job_failure(e)
            if failure is None:
                raise   # a bug: its traceback
            lost_peer = failure.status == EX_PEER_LOST
            self.report.failed(failure)
            linger(failure, self.watchdog.heartbeats)
            raise failure from None
        finally:
            self.report.finish(status)
            if not lost_peer:   # after a lost peer it stays armed: a rank that hangs on its way out still ends
                self.watchdog.close()

    def _job_failure(self, error: Exception) -> JobFailure | None:
        """The one-line failure an error stands for (a lost peer), or None for a bug."""
        if isinstance(error, JobFailure):
            return error
        if dist.is_peer_failure(error):
            return self.peer_loss.failure(self.state.position.step, cause=dist.peer_failure_cause(error))
        return None

    def _on_hang(self, silent: float) -> int:
        """The watchdog's thread, with the main thread stuck: the same line, the run closed FAILED; the status."""
        failure = self.peer_loss.failure(self.state.position.step,
                                         cause=f"no step finished for {silent:.0f} s, dist.hang_timeout")
        announce(failure)
        self.report.failed(failure)
        self.report.finish("FAILED")
        linger(failure, self.watchdog.heartbeats)
        return failure.status

    def _fit(self, stop: StopSignal) -> dict[str, float]:
        loaded = self.checkpoints.restore()
        if loaded is None:
            self.init_actnorm()
            self.state.broadcast()
        else:
            self.state.position = loaded.position.resumable(self.train_data.batches_per_epoch)
        self.start(loaded and loaded.run_id, loaded and loaded.path, fresh=loaded is None)
        return TrainingLoop(self).run(stop)

    def init_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's ActNorm init batch, dequantized with noise fixed by (seed, rank)."""
        cfg = self.cfg
        init_data = make_loader(cfg.data, cfg.model, "train", batch_size=cfg.train.init_batch_size, rank=self.rank,
                                world_size=self.world, device=self.device, seed=cfg.train.seed,
                                bad_samples=self.data_health.known, batch_key="train.init_batch_size")
        images, labels = next(iter(init_data.epoch(0)))
        x = preprocess(images, cfg.model.n_bits, generator=noise_generator(self.device, cfg.train.seed, -1, self.rank))
        return x, labels if cfg.model.y_condition else None

    def init_actnorm(self) -> None:
        """Data-dependent ActNorm init from every rank's init batch; the statistics are all-reduced, so the init
        equals one on all ranks' batches together."""
        self.state.model.initialize(*self.init_batch(), reduce_fn=dist.allreduce_sum)
        self.state.ema.reset(self.state.model)

    def log_evaluation(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Test bits/dim of both weights (collective), logged at `step` with `extra` metrics."""
        metrics = self.evaluator.both(self.test_data)
        self.report.metrics({**metrics, **(extra or {})}, step)
        return metrics

    def samples(self, step: int) -> None:
        model, note = self.evaluator.for_samples(step)
        was_training = model.training
        model.eval()
        try:
            self.report.samples(model, step, note)
        finally:
            model.train(was_training)

    def _log_rank0(self, text: str) -> None:
        if dist.is_main():
            print(text, flush=True)

    @staticmethod
    def _log_every_rank(text: str) -> None:
        """A rank's own news (its step fell back to eager): printed by that rank, which the line names."""
        print(text, flush=True)


def train(cfg: Config) -> dict[str, float]:
    """Build the trainer and train; a stop signal counts from the first line, start-up included."""
    with StopSignal() as stop:
        try:
            trainer = Trainer(cfg)
        except DataError as e:
            if e.everywhere and dist.is_main():   # data unusable before the first step: still a FAILED run to see
                report = NullReporter().for_rank(True, cfg, None, dist.size(), 0)
                report.failed(data_failure(e, 0))
                report.finish("FAILED")
            raise
        return trainer.fit(stop)


def data_failure(error: DataError, step: int) -> JobFailure:
    """A data error that ended the job, as the run's `failure.*` tags (the line itself is printed by glow-dist)."""
    return JobFailure(str(error), reason="bad-data", kind="data", status=2, step=step)
