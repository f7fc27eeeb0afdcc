"""Polyak (exponential moving) averaging of weights, with a warm-up of the decay so it is right from the first step.

    ema = EMA(model, decay=0.999)
    ...                       # every optimizer step that was taken (not skipped):
    ema.update(model)         # p_ema += (1 - d_n) * (p - p_ema),  d_n = min(decay, (1 + n) / (20 + n)),  n += 1

Why a warm-up of the decay, and not a bias-corrected average. A plain average with decay 0.999 started at the
initial weights still holds decay**n of them after n steps: 45% after 800 steps, so on a short run, an early look at a
long run, or a tuning sweep, the averaged model scores far worse than the weights being trained (issue 17: 2.84 vs
1.66 bits/dim). There are two usual remedies:

- bias correction (Adam's): start the average at zero and divide by 1 - decay**n. That removes the initial weights,
  but while n << 1 / (1 - decay) it is still a near-uniform average over *every* step so far: after 800 steps at
  decay 0.999 it weighs the weights of step 1 (barely trained) 0.45 times as much as those of step 800.
- warm-up of the decay, `min(decay, (1 + n) / (k + n))` (TensorFlow's ExponentialMovingAverage with `num_updates`
  uses k = 10): 1 - d_n = (k - 1) / (k + n), so the average after n steps weighs step t roughly as (t / n)**(k - 2);
  it covers about the last n / (k - 1) steps, a fixed fraction of the run, and never the first, barely trained ones.
  The configured decay takes over at n = (k * decay - 1) / (1 - decay): 18,980 updates for k = 20 and 0.999, so long
  runs get exactly the configured average.

Measured on one trajectory of the default recipe (bench/bench_quality.py --ema-study; BENCHMARKS.md, "Model
quality"), test bits/dim minus the raw weights' at 200 / 400 / 800 steps: no warm-up +1.70 / +1.70 / +1.45;
bias-corrected +0.68 / +0.41 / +0.27; warm-up k = 4 +0.17 / +0.06 / +0.07; k = 10 +0.040 / -0.027 / +0.005;
k = 20 +0.008 / -0.040 / -0.013; k = 40 -0.005 / -0.039 / -0.020. So the warm-up, with k = 20: within 0.01 of the raw
weights or better at every budget, better than k = 10 at every budget, while still averaging over a window (about
n / 19 steps) that reaches the configured decay within a typical run.

The number of updates `n` is part of the state (`state_dict()["ema_updates"]`), so a resumed or elastic-reset run
goes on with the decay an unbroken one would use. A state without it (a checkpoint written before the warm-up
existed) loads with the number the caller passes as `default_updates`: the trainer passes the optimizer steps
taken (position.step - position.skipped_steps), the count an unbroken run with the warm-up would have reached, so
the decay continues where it would have been. That average itself was made without the warm-up and still holds the
old bias; at the warmed-up decay it fades within about n / 19 further steps instead of never.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from glow_dist.checkpoint import EMA_UPDATES_KEY

UPDATES_KEY = EMA_UPDATES_KEY  # in state_dict(): the number of updates so far (an int64 scalar tensor)
WARMUP_OFFSET = 20           # d_n = min(decay, (1 + n) / (WARMUP_OFFSET + n)); 20 measured better than 10


def warmup_decay(decay: float, updates: int) -> float:
    """The decay used by update number `updates` (0-based): min(decay, (1 + n) / (20 + n))."""
    return min(decay, (1.0 + updates) / (WARMUP_OFFSET + updates))


class EMA:
    """Keeps `model` (a full copy, buffers included) with parameters averaged as p_ema += (1 - d_n) * (p - p_ema),
    d_n = min(decay, (1 + n) / (20 + n)) at the n-th update (see the module docstring).

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
        """The averaged weights (a Glow state dict) plus UPDATES_KEY (`checkpoint.model_weights` strips it)."""
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
        self.model.load_state_dict({k: v for k, v in state.items() if k != UPDATES_KEY})
        self.updates = updates
