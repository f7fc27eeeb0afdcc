"""The optimizer and its learning-rate schedule.

    optimizer = make_optimizer(cfg.optim, model)
    schedule = LearningRate(cfg.optim, world_size)
    schedule.apply(optimizer, step, lr_scale)     # before every step: sets each param group's lr

`optim.lr` is for the configured per-rank batch; `optim.lr_scaling` multiplies it by the world size (`linear`) or its
square root (`sqrt`), or keeps it (`none`, the paper's choice: 1e-3 at 40 ranks). It warms up linearly from 0 over
`optim.warmup_steps`, and a rollback multiplies it by `optim.rollback_lr_factor` (the position's `lr_scale`).
"""
from __future__ import annotations

import math

import torch

from glow_dist.config import OptimConfig


def make_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    kind = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam}[cfg.name]
    return kind(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


class LearningRate:
    def __init__(self, cfg: OptimConfig, world_size: int):
        self.cfg = cfg
        self.scale = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.lr_scaling]

    def __call__(self, step: int, lr_scale: float = 1.0) -> float:
        """The learning rate of (0-based) step `step`."""
        warmup = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps > 0 else 1.0
        return self.cfg.lr * self.scale * warmup * lr_scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int, lr_scale: float = 1.0) -> float:
        lr = self(step, lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
