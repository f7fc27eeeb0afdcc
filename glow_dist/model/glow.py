"""The multi-scale Glow model: L levels of (squeeze, K flow steps, split), with learned Gaussian priors.

    model = build_model(cfg.model, cfg.runtime)  # architecture; runtime: memory, layout, precision, compile
    model.initialize(x, reduce_fn)              # ActNorm data-dependent init (reduce_fn sums over ranks)
    log_px = model.log_prob(x)                  # (B,) nats, density of continuous x in [-0.5, 0.5]
    zs = model.encode(x); x = model.decode(zs)  # exact inverse
    x = model.sample(16, temperature=0.7)

Inputs are continuous images in [-0.5, 0.5]; `glow_dist.model.likelihood` turns uint8 images into them and
log densities into bits per dimension.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glow_dist.config import ModelConfig, RuntimeConfig
from glow_dist.model.invertible import invertible_flow
from glow_dist.model.layers import ActNorm, FlowStep, Reducer, ZeroConv2d, gaussian_log_prob, squeeze2d, unsqueeze2d
from glow_dist.runtime import bf16_on, channels_last_on


class GlowOutput(NamedTuple):
    zs: list[torch.Tensor]          # one latent per level, finest first; the last is the top latent
    logdet: torch.Tensor            # (B,) sum of log|det J| over every flow step
    log_prior: torch.Tensor         # (B,) sum of the priors' log densities of every latent
    y_logits: torch.Tensor | None   # (B, num_classes) from the classifier on the top latent, if y_condition

    @property
    def log_prob(self) -> torch.Tensor:
        return self.log_prior + self.logdet


class Level(nn.Module):
    """Squeeze, K flow steps, then (unless it is the top level) split off half the channels as a latent."""

    def __init__(self, in_channels: int, cfg: ModelConfig, runtime: RuntimeConfig, split: bool, size: int):
        super().__init__()
        channels = 4 * in_channels
        self.steps = nn.ModuleList(
            FlowStep(channels, cfg.width, cfg.coupling, cfg.invconv, bf16_on(runtime.autocast))
            for _ in range(cfg.steps)
        )
        if runtime.compile:
            for step in self.steps:
                step.compile()  # in place: parameter names (and so checkpoints) are unchanged
        # Conditional prior of the split-off half, predicted from the half that continues.
        self.prior = ZeroConv2d(channels // 2, channels) if split else None
        self.memory = runtime.memory
        self.invertible_segment = runtime.invertible_segment
        # NHWC where it helps: measured on oneDNN, NHWC convolutions win at 16x16 and 8x8 and lose at 4x4; on an
        # H100 (cuDNN) NHWC cost 20%, so `auto` is NCHW on CUDA. Chosen per call from the input's device.
        large = size // 2 >= runtime.channels_last_min_size  # size: the input's, before squeeze
        self._formats = {device: torch.channels_last if large and channels_last_on(runtime.channels_last, device)
                         else torch.contiguous_format for device in ("cpu", "cuda")}
        self.out_channels = channels // 2 if split else channels

    def format_for(self, x: torch.Tensor) -> torch.memory_format:
        """The activation layout on x's device (accelerators other than CUDA follow CUDA's choice)."""
        return self._formats["cpu" if x.device.type == "cpu" else "cuda"]

    def flow(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K flow steps: (B, C, H, W) -> same shape, logdet (B,). `memory` decides what backward keeps:
        plain stores every step's activations, checkpoint each step's input, invertible only the chain's output."""
        x = x.contiguous(memory_format=self.format_for(x))
        if self.memory == "invertible":
            return invertible_flow(self.steps, x, self.invertible_segment)
        checkpointing = self.memory == "checkpoint" and torch.is_grad_enabled()
        if self.memory == "auto" and torch.is_grad_enabled():
            raise ValueError("runtime.memory=auto is resolved for a device and batch before the model is built "
                             "(glow_dist.model.resolve_memory); build it with the resolved mode")
        logdet = None
        for step in self.steps:
            if checkpointing:
                # A flow step draws no random numbers, so the recompute needs no saved RNG state: without
                # preserve_rng_state=False checkpoint reads (and on recompute sets) the CUDA generator's state, which a
                # CUDA graph capture forbids (tests/test_memory.py checks that nothing inside draws).
                x, ld = checkpoint(step, x, use_reentrant=False, preserve_rng_state=False)
            else:
                x, ld = step(x)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet

    def reverse_flow(self, y: torch.Tensor) -> torch.Tensor:
        y = y.contiguous(memory_format=self.format_for(y))
        for step in reversed(self.steps):
            y = step.reverse(y)
        return y

    def split_prior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logs = self.prior(h).chunk(2, dim=1)
        return mean, logs


class Glow(nn.Module):
    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig | None = None):
        super().__init__()
        self.cfg = cfg
        runtime = runtime or RuntimeConfig()
        self.levels = nn.ModuleList()
        channels, size = cfg.channels, cfg.image_size
        for i in range(cfg.levels):
            level = Level(channels, cfg, runtime, split=i < cfg.levels - 1, size=size)
            self.levels.append(level)
            channels, size = level.out_channels, size // 2
        self.top_shape = (channels, size, size)
        # Learned top prior: a (mean, log-std) map per position, zero-initialized (standard normal at start).
        self.top = nn.Parameter(torch.zeros(1, 2 * channels, size, size)) if cfg.learn_top else None
        if cfg.y_condition:
            self.y_embed = nn.Linear(cfg.num_classes, 2 * channels)   # label -> shift of top prior
            self.y_classifier = nn.Linear(channels, cfg.num_classes)  # top latent -> label logits
            for layer in (self.y_embed, self.y_classifier):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        # channels_last applies to activations only (Level.flow): convolutions then run NHWC kernels, and the
        # weights and their gradients stay contiguous, as Horovod's all-reduce requires.

    @property
    def num_dims(self) -> int:
        return self.cfg.channels * self.cfg.image_size ** 2

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent returned by `encode`, finest level first."""
        shapes, channels, size = [], self.cfg.channels, self.cfg.image_size
        for level in self.levels[:-1]:
            channels, size = level.out_channels, size // 2
            shapes.append((channels, size, size))
        return shapes + [self.top_shape]

    def _top_prior(self, batch: int, y: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.top_shape
        params = like.new_zeros(batch, 2 * c, h, w) if self.top is None else self.top.expand(batch, -1, -1, -1)
        if self.cfg.y_condition:
            if y is None:
                raise ValueError("this model is class-conditional (model.y_condition=true): pass labels y")
            if not _capturing():  # the check reads values on the host; a CUDA-graph step checks before replay
                self.check_labels(y)
            onehot = F.one_hot(y.long(), self.cfg.num_classes).to(params.dtype)
            params = params + self.y_embed(onehot).view(batch, 2 * c, 1, 1)
        mean, logs = params.chunk(2, dim=1)
        return mean, logs

    def check_labels(self, y: torch.Tensor, sync: bool = True) -> None:
        """Labels must be class ids 0..num_classes-1. `sync=False`: checked on the device without waiting for it (a
        CUDA graph step, every step): a bad label stops the process there with a device-side assert."""
        if not sync:
            torch._assert_async(((y >= 0) & (y < self.cfg.num_classes)).all(),
                                f"labels must be in 0..{self.cfg.num_classes - 1}")
        elif y.min() < 0 or y.max() >= self.cfg.num_classes:
            raise ValueError(f"labels must be in 0..{self.cfg.num_classes - 1}, got {y.min()}..{y.max()}")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> GlowOutput:
        """Encode x: latents, the flow's logdet and the priors' log density, all per sample."""
        logdet = x.new_zeros(x.shape[0])
        log_prior = x.new_zeros(x.shape[0])
        zs = []
        h = x
        for level in self.levels:
            h, ld = level.flow(squeeze2d(h))
            logdet = logdet + ld
            if level.prior is not None:
                h, z = h.chunk(2, dim=1)
                mean, logs = level.split_prior(h)
                log_prior = log_prior + gaussian_log_prob(z, mean, logs)
                zs.append(z)
        mean, logs = self._top_prior(x.shape[0], y, h)
        log_prior = log_prior + gaussian_log_prob(h, mean, logs)
        zs.append(h)
        y_logits = self.y_classifier(h.mean(dim=(2, 3))) if self.cfg.y_condition else None
        return GlowOutput(zs, logdet, log_prior, y_logits)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Natural-log density of continuous x in [-0.5, 0.5]^D, shape (B,)."""
        return self.forward(x, y).log_prob

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The latents of x, finest level first (shapes: `latent_shapes()`)."""
        return self.forward(x, y).zs

    def decode(self, zs: list[torch.Tensor | None], y: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Invert `encode`. A latent given as None is drawn from its prior with std scaled by `temperature`."""
        if len(zs) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents (one per level), got {len(zs)}")
        batch = next(z.shape[0] for z in zs if z is not None) if any(z is not None for z in zs) else None
        if batch is None:
            raise ValueError("decode needs at least one latent to know the batch size; use sample()")
        return self._decode(zs, batch, y, temperature)

    def decode_noise(self, eps: list[torch.Tensor], temperature: torch.Tensor | float,
                     y: torch.Tensor | None = None) -> torch.Tensor:
        """`sample` with its standard-normal draws given, one per latent (shapes `latent_shapes()`, finest first):
        each latent is mean + exp(logs) * eps * temperature. Compiled and CUDA-graphed sampling run this, since
        everything that changes between their calls (draws, temperature, labels) must be an input tensor."""
        if len(eps) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} noise tensors (one per level), got {len(eps)}")
        return self._decode([None] * len(self.levels), eps[0].shape[0], y, temperature, noise=eps)

    def _decode(self, zs: list[torch.Tensor | None], batch: int, y: torch.Tensor | None,
                temperature: torch.Tensor | float, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        def draw(mean: torch.Tensor, logs: torch.Tensor, level: int) -> torch.Tensor:
            eps = torch.randn_like(mean) if noise is None else noise[level]
            return mean + torch.exp(logs) * eps * temperature

        like = self.levels[0].steps[0].actnorm.bias
        h = zs[-1]
        if h is None:
            h = draw(*self._top_prior(batch, y, like), len(self.levels) - 1)
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if level.prior is not None:
                z = zs[i]
                if z is None:
                    z = draw(*level.split_prior(h), i)
                h = torch.cat([h, z], dim=1)
            h = unsqueeze2d(level.reverse_flow(h))
        return h

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: torch.Tensor | None = None) -> torch.Tensor:
        """n images (continuous, about [-0.5, 0.5]) drawn with every prior's std multiplied by `temperature`."""
        return self._decode([None] * len(self.levels), n, y, temperature)

    def actnorms(self) -> Iterator[ActNorm]:
        return (m for m in self.modules() if isinstance(m, ActNorm))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None, reduce_fn: Reducer | None = None) -> None:
        """Data-dependent ActNorm init: one forward pass in which each ActNorm, in order, initializes itself from
        the statistics of its input, summed by `reduce_fn` over ranks when given. Initialized layers are skipped."""
        with _actnorm_init_hooks(self, reduce_fn):
            self.forward(x, y)

    @property
    def is_initialized(self) -> bool:
        return all(bool(a.initialized) for a in self.actnorms())


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _actnorm_init_hooks(model: Glow, reduce_fn: Reducer | None):
    """While active, every uninitialized ActNorm initializes from its input just before it runs."""
    def hook(module: ActNorm, args: tuple[torch.Tensor]) -> None:
        module.initialize(args[0], reduce_fn)

    handles = [a.register_forward_pre_hook(hook) for a in model.actnorms()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_model(cfg: ModelConfig, runtime: RuntimeConfig | None = None) -> Glow:
    """The model of an architecture, run as `runtime` says (default: plain memory, every `auto` resolved)."""
    return Glow(cfg, runtime)


def meta_model(cfg: ModelConfig, runtime: RuntimeConfig | None = None) -> Glow:
    """The model with meta tensors only: the real module tree (LU init included) without allocating weights."""
    with torch.device("meta"):
        return build_model(cfg, runtime)


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of an architecture, counted on the meta device (no memory, any size)."""
    return sum(p.numel() for p in meta_model(cfg).parameters())
