"""The EMA's decay warm-up, its update count in the state, and loading states written before the count existed."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from glow_dist.checkpoint import model_weights
from glow_dist.commands.evaluate_cmd import describe_weights
from glow_dist.training.ema import EMA, UPDATES_KEY, warmup_decay


def _model(value: float) -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_warmup_schedule():
    assert warmup_decay(0.999, 0) == pytest.approx(0.05)
    assert [warmup_decay(0.999, n) for n in (1, 2, 80)] == pytest.approx([2 / 21, 3 / 22, 81 / 100])
    # The configured decay takes over where (1 + n) / (20 + n) reaches it: n = 18,980 for 0.999.
    assert warmup_decay(0.999, 18979) < 0.999
    assert warmup_decay(0.999, 18981) == 0.999 == warmup_decay(0.999, 10 ** 6)
    assert warmup_decay(0.9, 170) == 0.9 and warmup_decay(0.0, 5) == 0.0


def test_update_counts_and_uses_the_warmed_up_decay():
    live, ema = _model(0.0), None
    ema = EMA(live, decay=0.999)
    assert ema.updates == 0 and ema.current_decay == pytest.approx(0.05)
    for n in range(3):
        before = ema.model.weight.clone()
        with torch.no_grad():
            live.weight.fill_(float(n + 1))
        ema.update(live)
        d = (1 + n) / (20 + n)
        torch.testing.assert_close(ema.model.weight, d * before + (1 - d) * live.weight)
        assert ema.updates == n + 1
    ema.reset(live)
    assert ema.updates == 0 and torch.equal(ema.model.weight, live.weight)


def test_initial_weights_fade_after_a_short_run():
    """The issue's case: 800 steps at decay 0.999. Without a warm-up 0.999**800 = 45% of the average is still the
    initial weights; with it, none to float precision."""
    live = _model(0.0)
    ema = EMA(live, decay=0.999)
    with torch.no_grad():
        live.weight.fill_(1.0)  # trained weights constant at 1: what remains of 0 is the initial weights' share
    for _ in range(800):
        ema.update(live)
    share_of_init = 1.0 - ema.model.weight.mean().item()
    assert share_of_init < 1e-6, share_of_init
    assert math.prod(warmup_decay(0.999, n) for n in range(800)) < 1e-20  # the exact share, in double precision
    assert 0.999 ** 800 > 0.44


def test_decay_zero_follows_the_live_weights():
    live = _model(0.0)
    ema = EMA(live, decay=0.0)
    with torch.no_grad():
        live.weight.fill_(3.0)
    ema.update(live)
    assert torch.equal(ema.model.weight, live.weight) and ema.updates == 1


def test_state_round_trip_continues_identically():
    live = _model(0.0)
    a = EMA(live, decay=0.99)
    for v in (1.0, 2.0, 3.0):
        with torch.no_grad():
            live.weight.fill_(v)
        a.update(live)
    state = a.state_dict()
    assert int(state[UPDATES_KEY]) == 3 and state[UPDATES_KEY].dtype == torch.int64
    assert set(model_weights({"ema": state})) == set(live.state_dict())  # loadable as the model's own state dict
    b = EMA(_model(7.0), decay=0.99)
    b.load_state_dict(state)
    assert b.updates == 3
    with torch.no_grad():
        live.weight.fill_(5.0)
    a.update(live)
    b.update(live)
    assert torch.equal(a.model.weight, b.model.weight) and a.updates == b.updates == 4


def test_old_state_without_count_loads_with_the_given_count():
    live = _model(2.0)
    old_state = live.state_dict()  # what checkpoints held as "ema" before the warm-up
    ema = EMA(_model(0.0), decay=0.999)
    with pytest.raises(ValueError, match="default_updates"):
        ema.load_state_dict(old_state)
    ema.load_state_dict(old_state, default_updates=800)
    assert ema.updates == 800 and torch.equal(ema.model.weight, live.weight)
    assert ema.current_decay == pytest.approx(801 / 820)


def test_evaluate_states_the_weights():
    cfg = {"optim": {"ema_decay": 0.999}}
    state = {"config": cfg, "ema": {"w": torch.zeros(1), UPDATES_KEY: torch.tensor(800)}}
    assert describe_weights(state, raw=True).startswith("raw")
    text = describe_weights(state, raw=False)
    assert text.startswith("EMA") and "800 updates" in text and f"{801 / 820:.4f}" in text and "(1+n)/(20+n)" in text
    old = {"config": cfg, "ema": {"w": torch.zeros(1)}}
    assert "before the EMA warm-up" in describe_weights(old, raw=False)
    assert "raw weights" in describe_weights({"config": {"optim": {"ema_decay": 0.0}}, "ema": {}}, raw=False)
