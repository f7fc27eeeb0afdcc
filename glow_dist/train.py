"""Training: Glow on WebDataset shards, as one process or as many ranks under horovodrun.

    glow-dist train --config configs/debug.yaml                                       # one process
    horovodrun -np 2 -H localhost:2 --gloo glow-dist train --config configs/digits.yaml
    horovodrun -np 40 --hostfile launch/hostfile.example glow-dist train --config configs/celeba_hq_256.yaml

Learning rate: `optim.lr` is for the configured per-rank batch; `optim.lr_scaling` multiplies it by the world size
(`linear`) or its square root (`sqrt`), or keeps it (`none`, the paper's choice: 1e-3 at 40 ranks). It warms up
linearly from 0 over `optim.warmup_steps`.

Determinism: data order depends on (seed, epoch), dequantization noise on (seed, step, rank), so with
`train.deterministic=true` a run stopped and resumed from a checkpoint ends with the same weights as one that
never stopped.

Reliability: a non-finite loss or gradient on any rank makes every rank skip the step; after
`train.max_consecutive_skips` in a row, every rank rolls back to the newest good checkpoint with the learning rate
multiplied by `optim.rollback_lr_factor`.

Stopping: SIGTERM (scancel, preemption, pod deletion, `docker stop`), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's early
warning, `#SBATCH --signal=B:USR1@LEAD`) make every rank stop after the same step: rank 0 writes a verified
checkpoint, the MLflow run ends KILLED with a `stop.reason` tag, and the process exits with `train.stop_exit_code`
(0 by default). Under horovodrun, launch with `glow-dist-horovodrun` (glow_dist/launcher.py) so the launcher
waits for that checkpoint instead of killing the ranks 5 s after the signal. A second SIGINT interrupts at once.

Elastic (`dist.elastic=true`, Horovod elastic over Gloo): workers may be lost and added while the job runs.

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script launch/discover_hosts.sh --gloo \
        glow-dist train --config configs/digits.yaml dist.elastic=true

Every `dist.commit_every` steps the weights, optimizer, EMA and position are committed to host memory. When a worker
dies the others roll back to the last commit, Horovod restarts with the smaller world, data sharding is rebuilt for
it and training goes on; a worker that (re)joins gets rank 0's state. The position within the epoch is mapped
proportionally (batch b of B becomes b * B' // B), so an epoch still covers about one pass over the data.

Fault drill: GLOW_DIST_INJECT_NONFINITE="STEP:RANK[,STEP:RANK...]" makes that rank's loss NaN once at that step, to
check the collective skip and the rollback (tests use it; so can an operator on a new cluster).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glow_dist import dist
from glow_dist.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    verify_checkpoint,
)
from glow_dist.config import Config, ConfigError, to_dict
from glow_dist.data import make_loader
from glow_dist.data.manifest import train_batches
from glow_dist.ema import EMA
from glow_dist.evaluate import evaluate_bpd
from glow_dist.model import Glow, build_model, preprocess
from glow_dist.reporter import NullReporter, Reporter
from glow_dist.step import apply_tf32, build_train_step, noise_generator
from glow_dist.tracking import git_commit, gpu_type, make_tracker


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


def _injected_faults() -> set[tuple[int, int]]:
    spec = os.environ.get("GLOW_DIST_INJECT_NONFINITE", "")
    try:
        return {(int(a), int(b)) for a, b in (item.split(":") for item in spec.split(",") if item.strip())}
    except ValueError:
        raise ConfigError(f"GLOW_DIST_INJECT_NONFINITE={spec!r}: expected STEP:RANK[,STEP:RANK...]") from None


def learning_rate(cfg: Config, step: int, world_size: int, lr_scale: float = 1.0) -> float:
    scale = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.optim.lr_scaling]
    warmup = min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps > 0 else 1.0
    return cfg.optim.lr * scale * warmup * lr_scale


class StopSignal:
    """SIGTERM, SIGINT or SIGUSR1 sets a flag that the loop checks after every step (every rank votes on it with the
    step's skip decision), so the job saves a checkpoint and exits cleanly. A second SIGINT interrupts at once.

    Installed before anything starts (loaders, Horovod, MLflow): a signal that arrives during start-up is kept and
    acted on after the first step, never the default action that would kill the process mid-way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    kind = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam}[cfg.optim.name]
    return kind(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                weight_decay=cfg.optim.weight_decay)


def find_resume_checkpoint(cfg: Config) -> tuple[Path, dict] | None:
    """The checkpoint `train.resume` asks for (read on rank 0 only), or None for a fresh start."""
    mode = cfg.train.resume
    if mode == "never":
        if list_checkpoints(cfg.train.run_dir):
            raise ConfigError(f"train.resume=never but {cfg.train.run_dir} already has checkpoints; starting over "
                              "would rotate them away. Use train.resume=auto, or another train.run_dir")
        return None
    if mode == "auto":
        return load_latest(cfg.train.run_dir)
    path = Path(mode)
    if not path.is_file():
        raise CheckpointError(f"train.resume={mode}: no such checkpoint file; use auto, never or a ckpt-*.pt path")
    return path, load_checkpoint(path)


# Model keys that change speed or memory, not the weights: a checkpoint resumes under any value of them.
SPEED_ONLY_MODEL_KEYS = ("memory", "channels_last", "channels_last_min_size", "autocast", "compile",
                         "invertible_segment")


def check_same_architecture(cfg: Config, saved_config: dict, source: str) -> None:
    saved, current = saved_config["model"], to_dict(cfg)["model"]
    changed = {k: (saved.get(k), v) for k, v in current.items()
               if k not in SPEED_ONLY_MODEL_KEYS and saved.get(k) != v}
    if changed:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"{source} was trained with a different model ({detail}); use its config or a new run_dir")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        dist.init(cfg.dist.background_priority)
        self.rank, self.world = dist.rank(), dist.size()
        self.device = dist.pin_device()
        threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // dist.local_size())
        torch.set_num_threads(threads)  # N ranks on one host share its cores
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        apply_tf32(cfg.train.tf32, self.device)
        torch.manual_seed(cfg.train.seed)  # same initial weights everywhere; rank 0's are broadcast anyway

        self.model: Glow = build_model(cfg.model).to(self.device)
        # Wrap before any state is loaded: Horovod's DistributedOptimizer is a new optimizer built from the param
        # groups, so state loaded into the unwrapped one would be silently dropped.
        self.optimizer = dist.distributed_optimizer(make_optimizer(cfg, self.model), self.model,
                                                    cfg.dist.fp16_allreduce)
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.position = Position()
        self.faults = _injected_faults()
        self.step_fn = build_train_step(cfg, self.model, self.optimizer, self.ema, device=self.device,
                                        rank=self.rank, faults=self.faults, log=self._log_rank0)
        self._build_loaders()
        if cfg.dist.elastic:
            self._init_elastic()
            return

        resumed = self._restore()
        self._fresh = resumed is None
        if resumed is None:
            self._init_actnorm()
        self._sync_from_rank0()

        tracker = make_tracker(cfg, dist.is_main(), run_id=self._run_id, world_size=self.world)
        self.report = Reporter(cfg, tracker, self.position.step) if dist.is_main() else NullReporter()
        tags = {"hosts": str(dist.host_count()), "gpu_type": gpu_type(), "git_commit": git_commit(),
                "world_size": str(self.world), "data.backend": self.train_data.backend,
                "data.decode": self.train_data.decode}
        self.report.start(cfg, self.world, tags, resumed)
        self.report.message(self.train_data.describe())  # which backend and decoder actually run

    def _build_loaders(self) -> None:
        loader_args = dict(rank=self.rank, world_size=self.world, device=self.device, seed=self.cfg.train.seed)
        batch = self.cfg.train.batch_size
        self.train_data = make_loader(self.cfg.data, self.cfg.model, "train", batch_size=batch, **loader_args)
        self.test_data = make_loader(self.cfg.data, self.cfg.model, "test", batch_size=batch, **loader_args)

    def _init_elastic(self) -> None:
        """Elastic: no collective here. A worker joining a running job gets everything from the state's sync, the
        first collective it makes; rank 0 of a starting job reads the checkpoint that sync then broadcasts."""
        if not dist.elastic_launched():
            raise ConfigError("dist.elastic=true needs an elastic launch: horovodrun --host-discovery-script SCRIPT "
                              "--min-np N --max-np M --gloo ... (see launch/discover_hosts.sh)")
        if self.cfg.dist.commit_every < 1:
            raise ConfigError(f"dist.commit_every must be at least 1, got {self.cfg.dist.commit_every}")
        meta = self._load_local(find_resume_checkpoint(self.cfg)) if dist.is_main() else None
        batches_per_epoch = self.train_data.batches_per_epoch
        if meta is not None:
            self.position = Position(**meta["position"])
            batches_per_epoch = train_batches(self.train_data.total, meta["world_size"], self.cfg.train.batch_size)
        self.report: NullReporter = NullReporter()  # a Reporter on whichever process is rank 0, see _adopt_world
        self.state = dist.elastic_state(
            self.model, self.optimizer, self.ema.model, position=asdict(self.position), world=self.world,
            batches_per_epoch=batches_per_epoch, actnorm_done=meta is not None, run_id=meta and meta["run_id"],
            resumed=meta and meta["path"], ema_updates=self.ema.updates)
        self.state.register_reset_callbacks([self._on_elastic_reset])

    def _on_elastic_reset(self) -> None:
        """After Horovod restarted with a new world, before rank 0's state is broadcast."""
        dist.reset_gradient_hooks(self.optimizer)  # a step broken by the lost worker left handles behind
        self.rank, self.world = dist.rank(), dist.size()
        self.step_fn.rank = self.rank  # the noise and injected faults are per rank
        self._build_loaders()  # sharding for the new rank and world size

    def _adopt_world(self) -> None:
        """Elastic, at every (re)start on the synchronized state: position mapped to this world's epoch length,
        the Reporter on the current rank 0, the world size logged when it changed."""
        state = self.state
        position = Position(**state.position)
        if state.batches_per_epoch != self.train_data.batches_per_epoch:
            position.batch_in_epoch = position.batch_in_epoch * self.train_data.batches_per_epoch \
                // state.batches_per_epoch
        self.position = self._resumable(position)
        self.ema.updates = state.ema_updates  # the EMA weights were restored and synced by Horovod; the count here
        hosts = dist.host_count()  # collective: every rank calls it
        if dist.is_main() and not isinstance(self.report, Reporter):
            tracker = make_tracker(self.cfg, True, run_id=state.run_id, world_size=self.world)
            self.report = Reporter(self.cfg, tracker, self.position.step)
            tags = {"hosts": str(hosts), "gpu_type": gpu_type(), "git_commit": git_commit(),
                    "world_size": str(self.world), "elastic": "true"}
            self.report.start(self.cfg, self.world, tags, state.resumed)
        elif not dist.is_main() and isinstance(self.report, Reporter):
            self.report.finish("FINISHED")  # no longer rank 0: the new rank 0 reopens the same MLflow run
            self.report = NullReporter()
        state.run_id = dist.broadcast_object(self.report.run_id)  # so any survivor can carry the run on
        if state.world != self.world:
            self.report.message(f"world size {state.world} -> {self.world} at step {self.position.step}: data "
                                f"resharded, epoch {self.position.epoch} goes on at batch "
                                f"{self.position.batch_in_epoch}/{self.train_data.batches_per_epoch}")
        self.report.metrics({"world_size": float(self.world)}, self.position.step)
        state.world = self.world

    def _commit(self) -> None:
        """Elastic: the state to return to when a worker is lost; raises HostsUpdatedInterrupt on a host change."""
        state = self.state
        state.position, state.world = asdict(self.position), self.world
        state.ema_updates = self.ema.updates
        state.batches_per_epoch = self.train_data.batches_per_epoch
        state.commit()

    def _elastic_run(self, state: object, stop: StopSignal) -> dict[str, float]:
        """The training under dist.elastic_run; `state` is self.state (Horovod's wrapper syncs and restores it)."""
        self._adopt_world()
        if not self.state.actnorm_done:  # fresh start: data-dependent init once, before the first commit
            self._init_actnorm()
            self.state.actnorm_done = True
            self._commit()
            self._log_evaluation(0)  # fresh start only: the curves begin at the initial weights
        return self._loop(stop)

    def _sync_from_rank0(self) -> None:
        dist.broadcast_training_state(self.model, self.optimizer, self.ema.model)

    def _load_local(self, found: tuple[Path, dict] | None) -> dict | None:
        """Load a checkpoint's weights, EMA and optimizer into this process; its position, run id, path, world."""
        if found is None:
            return None
        path, state = found
        check_same_architecture(self.cfg, state["config"], str(path))
        self.model.load_state_dict(state["model"])
        # A checkpoint from before the EMA warm-up has no update count: it gets the optimizer steps it took, the
        # count an unbroken run would have reached (see glow_dist/ema.py).
        taken = state["position"]["step"] - state["position"].get("skipped_steps", 0)
        self.ema.load_state_dict(state["ema"], default_updates=taken)
        self.optimizer.load_state_dict(state["optimizer"])
        return {"position": state["position"], "run_id": state.get("mlflow_run_id"), "path": str(path),
                "world_size": state.get("world_size", self.world), "ema_updates": self.ema.updates}

    def _load_on_rank0(self, found: tuple[Path, dict] | None) -> dict | None:
        """Rank 0 loads a checkpoint; every rank gets its position, run id and path.
        The caller broadcasts the tensors with `_sync_from_rank0`."""
        return dist.broadcast_object(self._load_local(found))  # non-main ranks learn what rank 0 found

    def _restore(self) -> str | None:
        """Load what train.resume names (rank 0 reads it); None for a fresh start."""
        meta = self._load_on_rank0(find_resume_checkpoint(self.cfg) if dist.is_main() else None)
        self._run_id = meta["run_id"] if meta else None
        if meta is None:
            return None
        self.position = self._resumable(Position(**meta["position"]))
        self.ema.updates = meta["ema_updates"]  # rank 0's count; the weights come with _sync_from_rank0
        return meta["path"]

    def _resumable(self, p: Position) -> Position:
        # A checkpoint taken after the last batch of an epoch resumes at the start of the next one.
        if p.batch_in_epoch >= self.train_data.batches_per_epoch:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        p.consecutive_skips = 0
        return p

    def _rollback(self) -> None:
        """After too many consecutive non-finite steps: every rank returns to the newest good checkpoint and goes on
        with the learning rate multiplied by optim.rollback_lr_factor."""
        pos = self.position
        meta = self._load_on_rank0(load_latest(self.cfg.train.run_dir) if dist.is_main() else None)
        if meta is None:
            raise RuntimeError(f"{pos.consecutive_skips} consecutive steps had a non-finite loss or gradient and "
                               f"{self.cfg.train.run_dir} has no checkpoint to roll back to; lower optim.lr, raise "
                               "optim.warmup_steps, or checkpoint more often (train.checkpoint_every)")
        self._sync_from_rank0()
        self.ema.updates = meta["ema_updates"]
        restored = self._resumable(Position(**meta["position"]))
        restored.lr_scale = pos.lr_scale * self.cfg.optim.rollback_lr_factor
        restored.rollbacks = pos.rollbacks + 1
        restored.skipped_steps = pos.skipped_steps
        self.position = restored
        self.report.message(f"{pos.consecutive_skips} consecutive non-finite steps at step {pos.step}: rolled back to "
                            f"{meta['path']} (step {restored.step}), learning rate x{restored.lr_scale:g}")
        self.report.metrics({"rollbacks": float(restored.rollbacks), "lr_scale": restored.lr_scale}, pos.step)

    def init_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's ActNorm init batch, dequantized with noise fixed by (seed, rank)."""
        init_data = make_loader(self.cfg.data, self.cfg.model, "train", batch_size=self.cfg.train.init_batch_size,
                                rank=self.rank, world_size=self.world, device=self.device, seed=self.cfg.train.seed)
        images, labels = next(iter(init_data.epoch(0)))
        gen = noise_generator(self.device, self.cfg.train.seed, -1, self.rank)
        return preprocess(images, self.cfg.model.n_bits, generator=gen), labels if self._uses_labels else None

    def _init_actnorm(self) -> None:
        """Data-dependent ActNorm init from every rank's init batch: statistics are summed over ranks."""
        x, y = self.init_batch()
        # Distributed: every ActNorm's statistics are all-reduced, so the init equals one on all ranks' batches.
        self.model.initialize(x, y, reduce_fn=dist.allreduce_sum)
        self.ema.reset(self.model)

    @property
    def _uses_labels(self) -> bool:
        return self.cfg.model.y_condition

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": asdict(self.position),
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "mlflow_run_id": self.report.run_id,
            "world_size": self.world,
        }

    def _log_rank0(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   stop_requested: bool = False) -> tuple[torch.Tensor, dist.StepResult]:
        """One optimizer step (glow_dist/step.py, `train.step_mode`); returns this rank's bits/dim and the
        collective result (skipped, stop)."""
        lr = learning_rate(self.cfg, self.position.step, self.world, self.position.lr_scale)
        return self.step_fn(images, labels, lr, self.position.step, stop_requested)

    def evaluate(self, weights: str = "ema") -> float:
        """Test bits/dim of the EMA (`weights="ema"`) or raw (`"raw"`) weights; collective: every rank calls it."""
        model = {"ema": self.ema.model, "raw": self.model}[weights]
        return evaluate_bpd(model, self.test_data.epoch(0), self.cfg.model.n_bits,
                            reduce_fn=dist.allreduce_sum, y_condition=self._uses_labels,
                            max_batches=self.cfg.train.max_eval_batches, seed=self.cfg.train.seed)

    def evaluate_both(self) -> dict[str, float]:
        """`bits_per_dim/test_ema` and `bits_per_dim/test_raw`; remembered for the choice of sample weights.
        While the EMA copy is the raw weights (no update since its reset, or decay 0), one pass scores both."""
        ema = self.evaluate("ema")
        raw = ema if self.ema.updates == 0 or self.ema.decay == 0 else self.evaluate("raw")
        self._last_eval = {"ema": ema, "raw": raw}
        return {"bits_per_dim/test_ema": ema, "bits_per_dim/test_raw": raw}

    def _log_evaluation(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        metrics = self.evaluate_both()
        self.report.metrics({**metrics, **(extra or {})}, step)
        return metrics

    def sample_weights(self) -> str:
        """`ema` or `raw`: tracking.sample_weights, or for `best` whichever scored lower at the last evaluation
        (the EMA before any evaluation of this process, e.g. right after a resume)."""
        choice = self.cfg.tracking.sample_weights
        if choice != "best":
            return choice
        scores = getattr(self, "_last_eval", None)
        return "raw" if scores and scores["raw"] < scores["ema"] else "ema"

    def _samples(self, step: int) -> None:
        weights = self.sample_weights()
        scores = getattr(self, "_last_eval", None)
        why = (f"tracking.sample_weights={self.cfg.tracking.sample_weights}" +
               (f"; test bits/dim EMA {scores['ema']:.4f}, raw {scores['raw']:.4f}" if scores else ""))
        self.report.message(f"samples at step {step} from the {'EMA' if weights == 'ema' else 'raw'} weights ({why})")
        model = self.ema.model if weights == "ema" else self.model
        was_training = model.training
        model.eval()
        try:
            self.report.samples(model, step)
        finally:
            model.train(was_training)

    def fit(self, stop: StopSignal | None = None) -> dict[str, float]:
        """Train to train.steps, or until a stop signal (see StopSignal); the MLflow run ends FINISHED, KILLED (a
        stop, with a `stop.reason` tag) or FAILED, never left RUNNING."""
        if stop is None:
            with StopSignal() as own:
                return self.fit(own)
        status = "FAILED"
        try:
            if self.cfg.dist.elastic:
                result = dist.elastic_run(self._elastic_run)(self.state, stop)
            else:
                if self._fresh and self.position.step == 0:
                    # Fresh start only: the curves, and the image slider (which opens at step 0), begin at the
                    # initial weights.
                    self._log_evaluation(0)
                    if self.cfg.train.sample_every > 0:
                        self._samples(0)
                result = self._loop(stop)
            status = "KILLED" if result.get("stopped") else "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            self._tag_stop("SIGINT (second: no checkpoint)", self.position.step, None)
            raise
        finally:
            self.report.finish(status)

    def _tag_stop(self, reason: str, step: int, checkpoint: Path | None) -> None:
        tracker = getattr(self.report, "tracker", None)  # rank 0 only
        if tracker is not None:
            tracker.set_tags({"stop.reason": reason, "stop.step": str(step),
                              "stop.checkpoint": str(checkpoint) if checkpoint else "none"})

    def _loop(self, stop: StopSignal) -> dict[str, float]:
        cfg = self.cfg
        interval = {"bpd": 0.0, "grad_norm": 0.0, "n": 0, "t0": time.perf_counter()}
        while self.position.step < cfg.train.steps:
            pos = self.position
            # closing(): on a stop or rollback the loader's workers are shut down here, before the checkpoint.
            with contextlib.closing(self.train_data.epoch(pos.epoch, start_batch=pos.batch_in_epoch)) as batches:
                stopped_by = self._epoch(batches, stop, interval)
            if stopped_by is not None:
                return self._stop(stopped_by)
            if self.position.batch_in_epoch >= self.train_data.batches_per_epoch:
                self.position.epoch, self.position.batch_in_epoch = self.position.epoch + 1, 0
        return self._finish()

    def _epoch(self, batches: Iterator, stop: StopSignal, interval: dict) -> str | None:
        """Steps over one epoch's batches; returns the stop reason when a stop was voted, else None."""
        cfg, pos = self.cfg, self.position
        for images, labels in batches:
            bpd, result = self.train_step(images, labels, stop.requested)
            skipped = result.skipped
            pos.step += 1
            pos.batch_in_epoch += 1
            pos.skipped_steps += int(skipped)
            pos.consecutive_skips = pos.consecutive_skips + 1 if skipped else 0
            if not skipped:  # accumulated on the device: read back only when logging
                interval["bpd"] = interval["bpd"] + bpd
                interval["grad_norm"] = interval["grad_norm"] + result.grad_norm
                interval["n"] += 1
            self.report.step(pos.step)
            self._periodic(interval)
            if result.stop:  # voted with the skip decision, so every rank stops after the same step
                return stop.name or "peer-signal"  # the signal reached another rank only
            if 0 < cfg.train.max_consecutive_skips <= pos.consecutive_skips:
                self._rollback()
                return None
            if cfg.dist.elastic and pos.step % cfg.dist.commit_every == 0:
                self._commit()
            if pos.step >= cfg.train.steps:
                return None
        return None

    def _stop(self, reason: str) -> dict[str, float]:
        step = self.position.step
        t0 = time.perf_counter()
        self.report.checkpoint(self.checkpoint_state, step, upload=False)  # within the grace period
        path = None
        if dist.is_main():  # read back against its sha256: the stop is reported only once the file is known good
            path = checkpoint_dir(self.cfg.train.run_dir) / f"ckpt-{step:08d}.pt"
            verify_checkpoint(path)
        self._tag_stop(reason, step, path)
        self.report.message(f"stopped by {reason} at step {step}; checkpoint {path} saved and verified in "
                            f"{time.perf_counter() - t0:.1f} s. Run the same command again to resume "
                            "(train.resume=auto)")
        return {"step": float(step), "skipped_steps": float(self.position.skipped_steps), "stopped": 1.0}

    def _periodic(self, interval: dict) -> None:
        cfg, step = self.cfg.train, self.position.step
        if step % cfg.log_every == 0:
            elapsed = time.perf_counter() - interval["t0"]
            n = max(interval["n"], 1)
            local = {"bits_per_dim/train": float(interval["bpd"]) / n, "grad_norm": float(interval["grad_norm"]) / n,
                     "images_per_sec": cfg.log_every * cfg.batch_size / max(elapsed, 1e-9)}
            metrics = dist.allreduce_scalars(local)  # averaged over ranks before logging
            metrics["images_per_sec"] *= self.world  # the job's throughput, not one rank's
            metrics["lr"] = learning_rate(self.cfg, step - 1, self.world, self.position.lr_scale)
            metrics["skipped_steps"] = float(self.position.skipped_steps)
            metrics["epoch"] = float(self.position.epoch)
            self.report.metrics(metrics, step)
            interval.update(bpd=0.0, grad_norm=0.0, n=0, t0=time.perf_counter())
        def due(every: int) -> bool:  # 0: only at the end (done by _finish)
            return every > 0 and step % every == 0 and step < cfg.steps

        if due(cfg.eval_every):
            self._log_evaluation(step)
        if due(cfg.sample_every):
            self._samples(step)
        # Not during a run of skipped steps: a rollback should land before the trouble started.
        if due(cfg.checkpoint_every) and self.position.consecutive_skips == 0:
            self.report.checkpoint(self.checkpoint_state, step)

    def _finish(self) -> dict[str, float]:
        step = self.position.step
        test = self._log_evaluation(step, {"skipped_steps": float(self.position.skipped_steps)})
        self._samples(step)
        self.report.checkpoint(self.checkpoint_state, step)
        self.report.message(f"final test bits/dim {test['bits_per_dim/test_ema']:.4f} with the EMA weights "
                            f"({self.ema.describe()}), {test['bits_per_dim/test_raw']:.4f} with the raw weights, "
                            f"after {step} steps ({self.position.skipped_steps} skipped)")
        tracker = getattr(self.report, "tracker", None)
        if tracker is not None:
            self.report.message(f"results: {tracker.describe()}")
        return {**test, "step": float(step), "skipped_steps": float(self.position.skipped_steps)}


def train(cfg: Config) -> dict[str, float]:
    """Build the trainer and train; a stop signal counts from the first line, start-up included."""
    with StopSignal() as stop:
        return Trainer(cfg).fit(stop)
