"""Memory modes and step options: invertible recomputation against plain backprop, memory flat in depth; gradient
checkpointing that a CUDA graph can capture; `runtime.memory: auto`."""

import pytest
import torch
from test_model import randomize, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from glow_dist.config import ConfigError, ModelConfig, RuntimeConfig, load_config
from glow_dist.model import Glow, build_model, measure_activations, resolve_memory, resolved_runtime
from glow_dist.model.memory import AUTO_PLAIN_FRACTION, state_bytes


def _grads(model: Glow, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model.log_prob(x).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _pair(memory: str, dtype: torch.dtype = torch.float32, scale: float = 0.1, **kw) -> tuple[Glow, Glow]:
    """A randomized plain model and a `memory` model with the same weights."""
    torch.manual_seed(0)
    plain = randomize(tiny_model(**kw), scale=scale).to(dtype)
    other = tiny_model(memory=memory, **kw).to(dtype)
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("coupling,invconv", [("affine", "lu"), ("additive", "plain"), ("additive", "lu")])
def test_invertible_gradients_equal_plain_backprop_float64(coupling, invconv):
    plain, inv = _pair("invertible", torch.float64, steps=3, coupling=coupling, invconv=invconv)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    torch.testing.assert_close(inv.log_prob(x), plain.log_prob(x), rtol=1e-12, atol=1e-10)
    for (name, _), g, h in zip(plain.named_parameters(), _grads(plain, x), _grads(inv, x), strict=True):
        torch.testing.assert_close(h, g, rtol=1e-9, atol=1e-11, msg=name)
    # The input's gradient too (used when the model is differentiated w.r.t. images).
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for model, xi in zip((plain, inv), xs, strict=True):
        model.log_prob(xi).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-11)


def test_invertible_gradients_equal_plain_backprop_float32():
    # 12 steps at the gentler scale of test_model's float32 round trip: the rebuilt inputs carry the rounding of
    # every later step's inverse, which grows with how ill-conditioned the random flow is.
    plain, inv = _pair("invertible", scale=0.05, steps=4, levels=3, image_size=16)
    x = torch.rand(4, 3, 16, 16) - 0.5
    g_plain, g_inv = _grads(plain, x), _grads(inv, x)
    # Norm-wise per tensor: single entries that are sums of cancelling terms carry the float32 rounding of the sum.
    for (name, _), g, h in zip(plain.named_parameters(), g_plain, g_inv, strict=True):
        assert (h - g).norm() <= 1e-4 * g.norm(), (name, float((h - g).norm() / g.norm()))
    total = torch.cat([(h - g).flatten() for g, h in zip(g_plain, g_inv, strict=True)]).norm()
    assert total <= 1e-5 * torch.cat([g.flatten() for g in g_plain]).norm()


def test_invertible_gradients_reach_accumulate_grad_hooks():
    """Horovod all-reduces each gradient from a hook on its AccumulateGrad node: every parameter must fire one."""
    _, inv = _pair("invertible")
    fired = set()
    for name, p in inv.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: fired.add(name))
    inv.log_prob(torch.rand(2, 3, 8, 8) - 0.5).mean().backward()
    assert fired == {name for name, _ in inv.named_parameters()}


def _saved_bytes(model: Glow, x: torch.Tensor) -> tuple[int, int]:
    """(bytes saved for backward at the end of forward, peak over forward + backward), weights excluded."""
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    live, refs, peak = [0], {}, [0]

    class Held:
        def __init__(self, t: torch.Tensor):
            self.t, self.key = t, t.untyped_storage()._cdata
            refs[self.key] = refs.get(self.key, 0) + 1
            if refs[self.key] == 1:
                live[0] += t.untyped_storage().nbytes()
                peak[0] = max(peak[0], live[0])

        def __del__(self):
            refs[self.key] -= 1
            if refs[self.key] == 0:
                live[0] -= self.t.untyped_storage().nbytes()

    def pack(t):
        return t if t.untyped_storage()._cdata in weights else Held(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h if isinstance(h, torch.Tensor) else h.t):
        loss = model.log_prob(x).mean()
        after_forward = live[0]
        loss.backward()
    return after_forward, peak[0]


def test_invertible_memory_is_constant_in_depth():
    x = torch.rand(2, 3, 8, 8) - 0.5
    saved = {}
    for memory in ("plain", "invertible"):
        for steps in (2, 6):
            torch.manual_seed(0)
            saved[memory, steps] = _saved_bytes(randomize(tiny_model(steps=steps, memory=memory)), x)
    assert saved["invertible", 2] == saved["invertible", 6]           # O(1) steps per level, forward and backward
    assert saved["plain", 6][0] > 2.5 * saved["plain", 2][0] > 0       # plain grows with K
    assert saved["invertible", 6][1] < saved["plain", 6][1] / 3


def test_invertible_mode_initializes_and_decodes():
    torch.manual_seed(1)
    plain = tiny_model()
    inv = tiny_model(memory="invertible")
    inv.load_state_dict(plain.state_dict())
    x = torch.rand(16, 3, 8, 8) - 0.5
    plain.initialize(x)
    inv.initialize(x)  # ActNorm init runs under no_grad, on the plain path
    assert inv.is_initialized
    for (name, p), q in zip(plain.state_dict().items(), inv.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, msg=name)
    with torch.no_grad():
        back = inv.decode(inv.encode(x))
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    assert inv.sample(2, temperature=0.7).shape == (2, 3, 8, 8)


def test_memory_modes_in_config():
    assert load_config(None, ["runtime.memory=invertible"]).runtime.memory == "invertible"
    assert load_config(None, ["runtime.autocast=bf16", "runtime.channels_last=true"]).runtime.autocast == "bf16"
    assert load_config(None, ["model.memory=checkpoint"]).runtime.memory == "checkpoint"  # the old place still loads
    with pytest.raises(ConfigError, match="runtime.memory"):
        load_config(None, ["runtime.memory=reversible"])


@pytest.mark.parametrize("memory", ["plain", "invertible"])
def test_channels_last_gives_the_same_model(memory):
    torch.manual_seed(0)
    plain = randomize(tiny_model(channels_last=False), scale=0.1)
    nhwc = tiny_model(memory=memory, channels_last=True, channels_last_min_size=1)  # NHWC in every level
    nhwc.load_state_dict(plain.state_dict())
    assert all(level.format_for(torch.empty(0)) == torch.channels_last for level in nhwc.levels)
    x = torch.rand(2, 3, 8, 8) - 0.5
    torch.testing.assert_close(nhwc.log_prob(x), plain.log_prob(x))
    grads = _grads(nhwc, x)
    for g, h in zip(_grads(plain, x), grads, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6)
    # Horovod all-reduces only contiguous tensors: NHWC activations must leave weights and gradients NCHW.
    assert all(p.is_contiguous() for p in nhwc.parameters())
    assert all(g.is_contiguous() for g in grads)
    assert set(nhwc.state_dict()) == set(plain.state_dict())  # checkpoints interchange
    with torch.no_grad():  # and the inverse runs in NHWC too
        torch.testing.assert_close(nhwc.decode(nhwc.encode(x)), x, rtol=1e-5, atol=1e-5)


def test_channels_last_only_where_feature_maps_are_large_enough():
    cfg = ModelConfig(image_size=32, channels=3, levels=3, steps=1, width=8)  # levels at 16x16, 8x8, 4x4
    cpu = torch.empty(0)
    formats = [level.format_for(cpu) for level in Glow(cfg).levels]
    assert formats == [torch.channels_last, torch.channels_last, torch.contiguous_format]
    off = RuntimeConfig(channels_last="false")
    assert all(level.format_for(cpu) == torch.contiguous_format for level in Glow(cfg, off).levels)


def test_bf16_coupling_stays_exactly_invertible_with_fp32_logdet():
    torch.manual_seed(2)
    model = randomize(tiny_model(autocast="bf16")).eval()
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        out = model(x)
        back = model.decode(out.zs)
    assert out.logdet.dtype == out.log_prior.dtype == torch.float32
    assert all(z.dtype == torch.float32 for z in out.zs)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_segmented_invertible_equals_plain_and_keeps_one_output_per_segment():
    """runtime.invertible_segment=2 over 6 steps: 3 recomputed segments per level, still exact in float64."""
    plain, inv = _pair("invertible", torch.float64, steps=6, invertible_segment=2)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    for (name, _), g, h in zip(plain.named_parameters(), _grads(plain, x), _grads(inv, x), strict=True):
        torch.testing.assert_close(h, g, rtol=1e-9, atol=1e-11, msg=name)
    x32 = x.float()
    torch.manual_seed(0)
    whole = _saved_bytes(randomize(tiny_model(steps=6, memory="invertible", invertible_segment=0)), x32)
    torch.manual_seed(0)
    segmented = _saved_bytes(randomize(tiny_model(steps=6, memory="invertible", invertible_segment=2)), x32)
    torch.manual_seed(0)
    plain_bytes = _saved_bytes(randomize(tiny_model(steps=6)), x32)
    assert whole[0] < segmented[0] < plain_bytes[0] / 2  # two more outputs per level, not six steps' graphs


class RandomOps(TorchDispatchMode):
    """Every operator that draws from a random generator (ATen tags them nondeterministic_seeded)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, {"coupling": "additive", "invconv": "plain"}])
def test_checkpointed_steps_draw_no_random_numbers_and_never_touch_the_rng_state(monkeypatch, kw):
    """What lets a CUDA graph capture a checkpointed step (issue 25): nothing inside a flow step draws random numbers
    (forward, backward and the recompute), so checkpoint runs with preserve_rng_state=False and neither reads nor
    restores any generator's state (reading the CUDA generator's state is forbidden while capturing)."""
    torch.manual_seed(0)
    model = randomize(tiny_model(memory="checkpoint", **kw))
    touched: list[str] = []

    def recorded(name: str, original):
        def call(*args, **kwargs):
            touched.append(name)
            return original(*args, **kwargs)
        return call

    for module, names in ((torch, ("get_rng_state", "set_rng_state")),
                          (torch.cuda, ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"))):
        for name in names:
            monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    x = torch.rand(2, 3, 8, 8) - 0.5
    with RandomOps() as drawn:
        model.log_prob(x).mean().backward()  # backward recomputes every step's forward
    assert drawn.seen == [] and touched == [], (drawn.seen, touched)
    assert all(p.grad is not None for p in model.parameters())


def test_memory_auto_is_plain_when_the_plan_estimate_fits_the_device_with_a_margin():
    cfg = ModelConfig(image_size=16, channels=3, levels=2, steps=4, width=32)
    need = measure_activations(cfg, 8)["plain"] + state_bytes(cfg)
    assert resolve_memory("auto", cfg, 8, capacity=int(need / AUTO_PLAIN_FRACTION) + 1)[0] == "plain"
    mode, why = resolve_memory("auto", cfg, 8, capacity=int(need / AUTO_PLAIN_FRACTION) - 1)
    assert mode == "checkpoint" and "more than 75%" in why
    assert resolve_memory("auto", cfg, 64, capacity=int(need / AUTO_PLAIN_FRACTION) + 1)[0] == "checkpoint"
    for asked in ("plain", "checkpoint", "invertible"):
        assert resolve_memory(asked, cfg, 8, capacity=1) == (asked, "")
    # The paper's CelebA-HQ architecture at batch 16: checkpoint on a 40 GB GPU, plain on an 80 GB one.
    celeba = load_config(None, ["model.image_size=256", "model.levels=6", "model.coupling=additive"]).model
    assert resolve_memory("auto", celeba, 16, capacity=40 * 2**30)[0] == "checkpoint"
    assert resolve_memory("auto", celeba, 16, capacity=80 * 2**30)[0] == "plain"


def test_memory_auto_must_be_resolved_before_training():
    cfg = load_config(None, ["runtime.memory=auto", "model.image_size=8", "model.levels=2", "model.steps=2",
                             "model.width=8"])
    model = build_model(cfg.model, cfg.runtime)
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        model.log_prob(x)  # evaluation and sampling do not care
    with pytest.raises(ValueError, match="runtime.memory=auto is resolved"):
        model.log_prob(x).mean().backward()
    runtime, why = resolved_runtime(cfg.runtime, cfg.model, batch=2, capacity=2**30)
    assert runtime.memory == "plain" and cfg.runtime.memory == "auto" and why.startswith("auto: plain")
    build_model(cfg.model, runtime).log_prob(x).mean().backward()
