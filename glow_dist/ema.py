"""Polyak (exponential moving) averaging of weights, with a warm-up of the decay so it is right from the first step.

    ema = EMA(model, decay=0.999)
    ...                       # every optimizer step that was taken (not skipped):
    ema.update(model)         # p_ema += (1 - d_n) * (p - p_ema),  d_n = min(decay, (1 + n) / (10 + n)),  n += 1

Why a warm-up of the decay, and not a bias-corrected average. A plain average with decay 0.999 started at the
initial weights still holds decay**n of them after n steps: 45% after 800 steps, so on a short run, an early look at a
long run, or a tuning sweep, the averaged model scores far worse than the weights being trained (issue 17: 2.84 vs
1.66 bits/dim). There are two usual remedies:

- bias correction (Adam's): start the average at zero and divide by 1 - decay**n. That removes the initial weights,
  but it is still a near-uniform average over *every* step so far while n << 1 / (1 - decay): after 800 steps at
  decay 0.999 it weighs the weights of step 1 (barely trained) 0.45 times as much as those of step 800. Early
  weights are the worst ones, so on a short run it is still much worse than the raw weights.
- warm-up of the decay (`min(decay, (1 + n) / (10 + n))`, as in TensorFlow's ExponentialMovingAverage with
  `num_updates` and most EMA implementations since): 1 - d_n = 9 / (10 + n), so the average after n steps weighs
  step t roughly as (t / n)**8: it always covers about the last 10% of the steps taken (90 steps at step 800),
  and the configured decay takes over at n = 8,990 (decay 0.999). Long runs get exactly the configured average,
  short ones an average of their recent, good weights.

The warm-up is the one that never averages in the first, barely trained weights, which is what a short run needs;
bench/bench_quality.py measures the result (BENCHMARKS.md, "Model quality"): EMA within 0.02 bits/dim of the raw
weights (and mostly better) from 200 steps on.

The number of updates `n` is part of the state (`state_dict()["ema_updates"]`), so a resumed or elastic-reset run
goes on with the decay an unbroken one would use. A state without it (a checkpoint written before the warm-up
existed) loads with the number the caller passes as `default_updates`: the trainer passes the optimizer steps
taken (position.step - position.skipped_steps), the count an unbroken run with the warm-up would have reached, so
the decay continues where it would have been. That average itself was made without the warm-up and still holds the
old bias; at the warmed-up decay it fades within about n / 9 further steps instead of never.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

UPDATES_KEY = "ema_updates"  # in state_dict(): the number of updates so far (an int64 scalar tensor)
WARMUP_OFFSET = 10           # d_n = min(decay, (1 + n) / (WARMUP_OFFSET + n))


def warmup_decay(decay: float, updates: int) -> float:
    """The decay used by update number `updates` (0-based): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + updates) / (WARMUP_OFFSET + updates))


def ema_weights(state: dict) -> dict:
    """The model weights of an EMA state (new with its update count, or old: the bare weights), loadable as a
    Glow state dict."""
    return {k: v for k, v in state.items() if k != UPDATES_KEY}


class EMA:
    """Keeps `model` (a full copy, buffers included) with parameters averaged as p_ema += (1 - d_n) * (p - p_ema),
    d_n = min(decay, (1 + n) / (10 + n)) at the n-th update (see the module docstring).

    With decay 0 the copy simply follows the live weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0  # updates since the average last started at the live weights
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @property
    def current_decay(self) -> float:
        """The decay the next update will use."""
        return warmup_decay(self.decay, self.updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        decay = self.current_decay
        if decay > 0:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        else:
            torch._foreach_copy_(ema_params, params)
        self.updates += 1
        # Buffers (ActNorm flags, LU permutations and masks) do not change while training; `reset` and
        # `load_state_dict` copy them, so the per-step update skips them.

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average at the current weights (after init or a resume without EMA state)."""
        self.model.load_state_dict(model.state_dict())
        self.updates = 0

    def describe(self) -> str:
        """One line for logs: the configured decay and where the warm-up stands."""
        if self.decay == 0:
            return "EMA disabled (decay 0: the EMA copy is the raw weights)"
        return f"decay {self.decay:g} with warm-up, {self.updates} updates, current decay {self.current_decay:.4f}"

    def state_dict(self) -> dict:
        """The averaged weights (a Glow state dict) plus UPDATES_KEY; `ema_weights` strips the count again."""
        return {**self.model.state_dict(), UPDATES_KEY: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict, default_updates: int | None = None) -> None:
        """Load a state from `state_dict()`, or an old one without the count, which then gets `default_updates`
        (required for such a state: the caller knows how many steps it took; see the module docstring)."""
        if UPDATES_KEY in state:
            updates = int(state[UPDATES_KEY])
        elif default_updates is not None:
            updates = int(default_updates)
        else:
            raise ValueError(f"EMA state without {UPDATES_KEY!r} (written before the warm-up): pass default_updates, "
                             "the number of optimizer steps it has averaged")
        self.model.load_state_dict(ema_weights(state))
        self.updates = updates
