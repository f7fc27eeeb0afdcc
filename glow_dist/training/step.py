"""The training step: one interface, three ways to run it (`runtime.step_mode`).

    step = build_train_step(cfg, model, optimizer, ema, device=device, rank=rank, faults=injected_faults())
    bpd, result = step(images, labels, step=position.step, stop_requested=stop.requested)

The learning rate is the optimizer's (glow_dist/training/optimizer.py sets it before each step).

Every mode does the same thing: dequantize the uint8 batch with noise fixed by (seed, step, rank), forward, bits/dim
(+ the class loss with `model.y_condition`), backward, then `dist.clip_and_step` (Horovod's gradient all-reduce,
clipping, the collective skip/stop vote, the optimizer step) and the EMA update unless the step was skipped.

- `eager`: plain PyTorch, one ATen operator (one or more kernel launches on a GPU) at a time.
- `compiled`: the objective (forward + likelihood) through `torch.compile`, so Inductor fuses the elementwise chains
  of forward and backward; convolutions stay cuDNN/oneDNN calls. The optimizer uses its multi-tensor (foreach) path.
- `graphed` (CUDA): forward + backward captured once into a CUDA graph over static input buffers and replayed
  every step: the whole pass costs one launch. Horovod's all-reduce cannot be captured, so the graph ends with the
  gradients; after each replay every gradient's all-reduce is started at once, in parameter order, as one Horovod
  group (`dist.allreduce_gradients_async`: the same submissions on every rank, fused), then `clip_and_step` waits
  for them, clips, votes and steps (foreach), and the EMA update runs after it, outside the graph, so a decay that
  changes from step to step (EMA warm-up) is read fresh every step.
- `auto`: `graphed` on CUDA, `eager` on CPU (measured there: compiling gave 0.94x, BENCHMARKS.md).

A configuration that a mode cannot run (graphed on CPU, with memory=invertible, elastic training) falls back to
eager with one log line saying why; after capture, the graph's first replay is compared with the eager pass it was
captured from, and a mismatch also falls back to eager (never silently wrong). The resolution and the
capture-and-check are glow_dist/runtime.py's, shared with graphed decoding.

Every rank runs the same mode. At its first call each step gathers every rank's mode and fallback reason (one
collective, `ranks`); if any rank could not capture, the graphed ranks drop their graphs and run eager too, so every
rank submits the same all-reduces (a graphed rank's grouped all-reduce and an eager rank's per-gradient hooks would
never match) and none waits for a slower one at every step. A rank that falls back logs why, with its rank
(`warn`, printed on every rank); `run_tags()` is what the run records (MLflow tags `runtime.step_mode`, and
`runtime.step_mode.fallbacks` naming each rank that could not capture and why).

GLOW_DIST_INJECT_NONFINITE faults ("STEP:RANK,...") make that rank's loss NaN once at that step in every mode
(in the graph, through a static loss factor that is 1 except at an injected step).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from glow_dist.config import Config, ConfigError
from glow_dist.distributed import gateway as dist
from glow_dist.model import Glow, bits_per_dim_from_log_prob, preprocess
from glow_dist.runtime import capture_graph, release_graph_memory, resolve_mode, step_capture_blockers
from glow_dist.training.ema import EMA


class TrainStep(Protocol):
    mode: str   # the mode that actually runs (after auto and any fallback)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, step: int,
                 stop_requested: bool = False) -> tuple[torch.Tensor, dist.StepResult]: ...

    def run_tags(self) -> dict[str, str]: ...


def step_rank_drill(name: str, value: str = "") -> dict[tuple[int, int], float]:
    """A fault drill's variable, NAME="STEP:RANK[,...]" or, with a `value` (its default), "STEP:RANK[:VALUE][,...]":
    (step, rank) -> that value."""
    spec = os.environ.get(name, "")
    try:
        found = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            step, rank, *rest = item.split(":")
            if len(rest) > (1 if value else 0):
                raise ValueError(item)
            found[int(step), int(rank)] = float(rest[0] if rest else value or 0)
        return found
    except ValueError:
        shape = "STEP:RANK[:SECONDS]" if value else "STEP:RANK"
        raise ConfigError(f"{name}={spec!r}: expected {shape}[,{shape}...]") from None


def injected_faults() -> set[tuple[int, int]]:
    """GLOW_DIST_INJECT_NONFINITE="STEP:RANK[,STEP:RANK...]": (step, rank) pairs whose loss is made NaN once."""
    return set(step_rank_drill("GLOW_DIST_INJECT_NONFINITE"))


def noise_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    # Noise as a function of (seed, step, rank) alone, so a resumed run draws what an unbroken one would have.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def objective(model: Glow, x: torch.Tensor, labels: torch.Tensor | None, n_bits: int,
              weight_y: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean bits/dim) of a dequantized batch: what every mode differentiates."""
    out = model(x, labels)
    bpd = bits_per_dim_from_log_prob(out.log_prob, model.num_dims, n_bits).mean()
    loss = bpd
    if out.y_logits is not None:  # the reference objective: bits/dim + weight_y * class cross-entropy in bits
        loss = loss + weight_y * F.cross_entropy(out.y_logits, labels) / math.log(2)
    return loss, bpd


def build_train_step(cfg: Config, model: Glow, optimizer: torch.optim.Optimizer, ema: EMA, *,
                     device: torch.device, rank: int = 0, faults: set[tuple[int, int]] | None = None,
                     log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> TrainStep:
    """The training step `runtime.step_mode` asks for; one log line when it falls back to eager. `log` takes the
    lines that are the same on every rank (the trainer prints them on rank 0), `warn` a rank's own fallback (printed
    on every rank; default: `log`)."""
    mode, reason = resolve_mode(cfg.runtime.step_mode, device, step_capture_blockers(cfg))
    if reason:
        log(f"[step] runtime.step_mode={cfg.runtime.step_mode}: running eager, because {reason}")
    kind = {"eager": EagerStep, "compiled": CompiledStep, "graphed": GraphedStep}[mode]
    return kind(cfg, model, optimizer, ema, device=device, rank=rank, faults=faults, log=log, warn=warn,
                reason=reason)


def rank_summary(ranks: list[tuple[str, str]]) -> dict[str, str]:
    """What a run records of its step: {"runtime.step_mode": the mode every rank runs, and, when some rank could not
    run the mode asked for, "runtime.step_mode.fallbacks": "rank R: why; ..."} (reasons shared by every rank once)."""
    reasons: dict[str, list[int]] = {}
    for r, (_, why) in enumerate(ranks):
        if why:
            reasons.setdefault(why, []).append(r)
    tags = {"runtime.step_mode": ranks[0][0] if len({m for m, _ in ranks}) == 1 else "mixed"}
    if reasons:
        tags["runtime.step_mode.fallbacks"] = "; ".join(
            f"{'every rank' if len(rs) == len(ranks) > 1 else 'rank ' + ','.join(map(str, rs))}: {why}"
            for why, rs in reasons.items())[:4000]  # MLflow's tag values are bounded
    return tags


class EagerStep:
    """The reference implementation; the other modes differ only in how loss and gradients are produced."""

    mode = "eager"
    foreach: bool | None = None   # the optimizer's multi-tensor path: None keeps torch's per-device default

    def __init__(self, cfg: Config, model: Glow, optimizer: torch.optim.Optimizer, ema: EMA, *,
                 device: torch.device, rank: int = 0, faults: set[tuple[int, int]] | None = None,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None, reason: str = ""):
        self.cfg, self.model, self.optimizer, self.ema = cfg, model, optimizer, ema
        self.device, self.rank, self.log, self.warn = device, rank, log, warn or log
        self.faults = faults if faults is not None else set()
        self.uses_labels = cfg.model.y_condition
        self.reason = reason   # why this is not the mode asked for ("" when it is)
        self.ranks: list[tuple[str, str]] | None = None   # every rank's (mode, reason), from the first call on

    def _agree(self) -> bool:
        """Collective, at the first call, before anything else of the step is submitted: every rank's mode and
        reason (`ranks`). True when every rank runs this rank's mode."""
        self.ranks = [tuple(r) for r in dist.allgather_object((self.mode, self.reason), name="step.modes")]
        return all(mode == self.mode for mode, _ in self.ranks)

    def run_tags(self) -> dict[str, str]:
        """The run's record of its step ({} before the first call): see `rank_summary`."""
        return rank_summary(self.ranks) if self.ranks else {}

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor | None,
                 step: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Dequantize; (x, labels or None, whether a fault is injected at this step)."""
        for group in self.optimizer.param_groups:
            group["foreach"] = self.foreach  # per mode, whatever a loaded optimizer state said
        gen = noise_generator(self.device, self.cfg.train.seed, step, self.rank)
        x = preprocess(images, self.cfg.model.n_bits, generator=gen)
        fault = (step, self.rank) in self.faults
        if fault:
            self.faults.discard((step, self.rank))  # one-shot, like a real transient fault
        return x, labels if self.uses_labels else None, fault

    def _loss(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return objective(self.model, x, labels, self.cfg.model.n_bits, self.cfg.optim.weight_y)

    def _finish(self, loss: torch.Tensor, stop_requested: bool) -> dist.StepResult:
        result = dist.clip_and_step(self.optimizer, self.model.parameters(), self.cfg.optim.grad_clip, loss=loss,
                                    stop_requested=stop_requested)
        if not result.skipped:
            self.ema.update(self.model)
        return result

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, step: int,
                 stop_requested: bool = False) -> tuple[torch.Tensor, dist.StepResult]:
        if self.ranks is None:
            self._agree()  # eager and compiled run whatever the others run: only graphed ranks need to agree
        x, y, fault = self._prepare(images, labels, step)
        loss, bpd = self._loss(x, y)
        if fault:
            loss = loss * float("nan")
        self.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch defaults to True
        loss.backward()
        return bpd.detach(), self._finish(loss, stop_requested)


class CompiledStep(EagerStep):
    """The objective through torch.compile (forward and, by AOTAutograd, backward); gradients still reach the
    parameters' AccumulateGrad nodes, so Horovod's all-reduce hooks fire as in eager."""

    mode = "compiled"
    foreach = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._compiled = torch.compile(objective, dynamic=False)

    def _loss(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._compiled(self.model, x, labels, self.cfg.model.n_bits, self.cfg.optim.weight_y)


class GraphedStep(EagerStep):
    """Forward + backward as one CUDA graph over static buffers (input, labels, loss factor), captured at the first
    call; the all-reduce, optimizer, vote and EMA run eagerly after each replay. A batch of another shape runs
    eagerly (one log line the first time)."""

    mode = "graphed"
    foreach = True
    warmup_passes = 3   # eager passes on a side stream before capture (cuDNN autotuning, lazy inits)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._eager_only = False
        self._logged_shape = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, step: int,
                 stop_requested: bool = False) -> tuple[torch.Tensor, dist.StepResult]:
        if self._eager_only:
            return super().__call__(images, labels, step, stop_requested)
        x, y, fault = self._prepare(images, labels, step)
        if self.graph is None:
            self.reason = self._capture(x, y)   # no collective inside: every rank reaches the vote below
            if self.reason:
                self.mode = "eager"
            if not self._agree():
                if not self.reason:
                    self.warn(f"[step] rank {self.rank}: runtime.step_mode=graphed: running eager, because "
                              f"{rank_summary(self.ranks).get('runtime.step_mode.fallbacks', 'another rank')} "
                              "(every rank runs the same mode, so that all submit the same all-reduces)")
                self.mode = "eager"
                self.ranks = [("eager", why) for _, why in self.ranks]  # what every rank now runs, and why
            if self.mode == "eager":
                self._drop_graph()
                return self._eager_from(x, y, fault, stop_requested)
            self.log(f"[step] graphed: forward + backward captured for batch {tuple(x.shape)} on every rank "
                     f"({len(self.ranks)})")
        if x.shape != self.static_x.shape or (y is not None and y.shape != self.static_y.shape):
            if not self._logged_shape:
                self.log(f"[step] graphed: batch of shape {tuple(x.shape)} differs from the captured "
                         f"{tuple(self.static_x.shape)}; such batches run eagerly")
                self._logged_shape = True
            return self._eager_from(x, y, fault, stop_requested)
        self.static_x.copy_(x)
        if y is not None:
            # On the device, no host sync: the capture skipped the model's own (host) check. A bad label stops the
            # process with a device-side assert; eager and compiled modes raise the model's ValueError instead.
            self.model.check_labels(y, sync=False)
            self.static_y.copy_(y)
        if fault:
            self.static_factor.fill_(float("nan"))
        self.graph.replay()
        if fault:
            self.static_factor.fill_(1.0)
        for p, g in zip(self.params, self.static_grads, strict=True):
            # A fresh alias of the graph's buffer every step: a decompressing all-reduce (Horovod with
            # dist.fp16_allreduce: p.grad.set_(averaged)) moves this alias onto the averaged gradient's storage, and
            # never the buffer that the next replay writes (binding the same tensor object each step would hand the
            # optimizer step 1's gradient forever). An eager step's zero_grad or backward may also have replaced it.
            p.grad = g.detach()
        dist.allreduce_gradients_async(self.optimizer, self.params)  # distributed: one group, in parameter order
        return self.static_bpd.detach().clone(), self._finish(self.static_loss, stop_requested)

    def _eager_from(self, x: torch.Tensor, y: torch.Tensor | None, fault: bool,
                    stop_requested: bool) -> tuple[torch.Tensor, dist.StepResult]:
        loss, bpd = self._loss(x, y)
        if fault:
            loss = loss * float("nan")
        self.optimizer.zero_grad()
        loss.backward()
        return bpd.detach(), self._finish(loss, stop_requested)

    def _capture(self, x: torch.Tensor, y: torch.Tensor | None) -> str:
        """Capture forward + backward on static copies of this batch; "" when done, else why not (logged with this
        rank): it could not be captured, or the replay does not reproduce the eager pass."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.static_x = x.clone()
        self.static_y = y.clone() if y is not None else None
        self.static_factor = torch.ones((), device=x.device)

        def clear_grads() -> None:
            for p in self.params:
                p.grad = None  # in the capture: backward allocates the gradients from the graph's pool

        def forward_backward() -> list[torch.Tensor]:
            clear_grads()
            loss, bpd = self._loss(self.static_x, self.static_y)
            loss = loss * self.static_factor
            loss.backward()
            return [loss, bpd, *[p.grad for p in self.params]]

        # Distributed: no all-reduce may start inside the capture; each replay's are started after it.
        with dist.gradient_hooks_suspended(self.optimizer):
            captured = capture_graph(forward_backward, warmup_passes=self.warmup_passes, log=self.warn,
                                     what=f"[step] rank {self.rank}: runtime.step_mode=graphed",
                                     before_capture=clear_grads)
        if isinstance(captured, str):
            return captured
        self.graph = captured.graph
        self.static_loss, self.static_bpd, *grads = captured.outputs
        self.static_grads = [g.detach() for g in grads]  # our own aliases of the graph's buffers, never bound to p.grad
        return ""

    def _drop_graph(self) -> None:
        """Run eagerly from now on, and free what the capture held: the graph and its pool (activations and a
        gradient-sized block), the static buffers."""
        self._eager_only = True
        for p in getattr(self, "params", []):
            p.grad = None
        self.graph = None
        for name in ("params", "static_x", "static_y", "static_factor", "static_loss", "static_bpd", "static_grads"):
            self.__dict__.pop(name, None)
        release_graph_memory()
