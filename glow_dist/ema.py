"""Polyak (exponential moving) averaging of weights: the averaged copy is what evaluation and samples use."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `model` (a full copy, buffers included) with parameters averaged as p_ema += (1 - decay) * (p - p_ema).

    With decay 0 the copy simply follows the live weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if self.decay > 0:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        else:
            torch._foreach_copy_(ema_params, params)
        # Buffers (ActNorm flags, LU permutations and masks) do not change while training; `reset` and
        # `load_state_dict` copy them, so the per-step update skips them.

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average at the current weights (after init or a resume without EMA state)."""
        self.model.load_state_dict(model.state_dict())

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
