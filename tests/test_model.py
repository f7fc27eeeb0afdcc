"""The Glow model against first principles: exact inverses, brute-force Jacobians in float64, analytic densities."""
import dataclasses
import math

import pytest
import torch

from glow_dist.config import ModelConfig, RuntimeConfig
from glow_dist.model import Glow, bits_per_dim, bits_per_dim_from_log_prob, postprocess, preprocess, quantize
from glow_dist.model.layers import (
    ActNorm,
    Coupling,
    FlowStep,
    InvConv1x1,
    InvConv1x1LU,
    ZeroConv2d,
)


def randomize(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialized layers are not the identity and the tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, ActNorm):
                m.initialized.fill_(True)
    return module


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each sample of x, from the full Jacobian built by autograd (float64)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).flatten(), xi).reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(image_size=8, channels=3, levels=2, steps=2, width=8, coupling="affine", invconv="lu", n_bits=5)
    base.update(kw)
    return ModelConfig(**base)


RUNTIME_KEYS = {f.name for f in dataclasses.fields(RuntimeConfig)}


def tiny_model(**kw) -> Glow:
    """A tiny Glow; keys of RuntimeConfig (memory, channels_last, autocast, ...) go to its runtime."""
    runtime = {k: str(v).lower() if isinstance(v, bool) and k == "channels_last" else v
               for k, v in kw.items() if k in RUNTIME_KEYS}
    return Glow(tiny_cfg(**{k: v for k, v in kw.items() if k not in RUNTIME_KEYS}), RuntimeConfig(**runtime))


LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "invconv": lambda c: InvConv1x1(c),
    "invconv_lu": lambda c: InvConv1x1LU(c),
    "coupling_affine": lambda c: Coupling(c, 8, "affine"),
    "coupling_additive": lambda c: Coupling(c, 8, "additive"),
    "flowstep_lu_affine": lambda c: FlowStep(c, 8, "affine", "lu"),
    "flowstep_plain_additive": lambda c: FlowStep(c, 8, "additive", "plain"),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverse_float32(name):
    torch.manual_seed(1)
    layer = randomize(LAYERS[name](4)).eval()
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        y, logdet = layer(x)
        assert logdet.shape == (3,)
        assert not torch.allclose(y.reshape(-1)[: x.numel()], x.reshape(-1), atol=1e-3)
        x_back = layer.reverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_logdet_matches_brute_force_jacobian(name):
    torch.manual_seed(2)
    layer = randomize(LAYERS[name](4)).double().eval()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = layer(x)
    expected = brute_force_logdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)


def test_zero_initialized_layers_start_as_identity():
    x = torch.randn(2, 4, 4, 4)
    assert torch.equal(ZeroConv2d(4, 6)(x), torch.zeros(2, 6, 4, 4))
    y, logdet = Coupling(4, 8, "additive")(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(2))
    # Affine starts at shift 0 and scale sigmoid(0 + 2), as in the reference code.
    y, logdet = Coupling(4, 8, "affine")(x)
    scale = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(y, torch.cat([x[:, :2], x[:, 2:] * scale], dim=1))
    torch.testing.assert_close(logdet, torch.full((2,), 2 * 4 * 4 * math.log(scale)))


@pytest.mark.parametrize("coupling,invconv", [("affine", "lu"), ("additive", "plain"), ("additive", "lu")])
def test_model_inverse_and_logdet(coupling, invconv):
    torch.manual_seed(3)
    cfg = tiny_cfg(image_size=4, channels=2, levels=2, steps=2, coupling=coupling, invconv=invconv)
    model = randomize(Glow(cfg)).double().eval()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64) - 0.5
    with torch.no_grad():
        out = model(x)
        x_back = model.decode(out.zs)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    expected = brute_force_logdet(lambda v: torch.cat([z.flatten(1) for z in model(v).zs], dim=1), x)
    torch.testing.assert_close(out.logdet, expected, rtol=1e-9, atol=1e-9)


def test_model_inverse_float32_at_rounding_level():
    torch.manual_seed(4)
    # 12 random affine steps at a gentler scale: larger perturbations make the flow ill-conditioned, not wrong.
    model = randomize(tiny_model(image_size=16, levels=3, steps=4, width=16), scale=0.05).eval()
    x = torch.rand(4, 3, 16, 16) - 0.5
    with torch.no_grad():
        x_back = model.decode(model.encode(x))
    assert (x_back - x).abs().max() < 1e-4


def test_log_prob_identity_flow_is_standard_normal():
    """With the flow fixed to the identity and standard normal priors, log p(x) is the analytic N(0, I) density."""
    cfg = tiny_cfg(levels=2, steps=2, learn_top=False, invconv="plain", coupling="additive")
    model = Glow(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InvConv1x1):
                m.weight.copy_(torch.eye(m.weight.shape[0]))
    x = torch.rand(5, 3, 8, 8) - 0.5
    d = x[0].numel()
    expected = -0.5 * (x.flatten(1) ** 2).sum(dim=1) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-5, atol=1e-4)
    # ... and bits/dim follows the notes' formula exactly.
    bpd = bits_per_dim_from_log_prob(expected, d, cfg.n_bits)
    torch.testing.assert_close(bpd, (-expected + d * cfg.n_bits * math.log(2)) / (d * math.log(2)))


class UniformOverBins(torch.nn.Module):
    """The uniform density on [-0.5, 0.5]^D: every bin gets probability n_bins^-D."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        inside = ((x >= -0.5) & (x < 0.5)).flatten(1).all(dim=1)
        return torch.where(inside, 0.0, -math.inf)


@pytest.mark.parametrize("n_bits", [1, 5, 8])
def test_uniform_model_scores_n_bits(n_bits):
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    bpd = bits_per_dim(UniformOverBins(), images, n_bits=n_bits)
    torch.testing.assert_close(bpd, torch.full((6,), float(n_bits)))


def test_quantization_from_integers_and_exact_round_trip():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    bins = quantize(images, 5)
    assert bins.min() == 0 and bins.max() == 31 and bins[0, 0, 0, 7] == 0 and bins[0, 0, 0, 8] == 1
    x = preprocess(images, 5, noise=True)
    assert x.min() >= -0.5 and x.max() < 0.5
    # Noise stays inside the bin, so postprocess recovers the quantized image exactly.
    assert torch.equal(postprocess(x, 5), (bins * 8).to(torch.uint8))
    assert torch.equal(postprocess(preprocess(images, 8, noise=False), 8), images)
    with pytest.raises(TypeError, match="uint8"):
        quantize(images.float() / 255, 5)


def test_encode_decode_reproduces_uint8_images():
    torch.manual_seed(5)
    model = randomize(tiny_model(n_bits=8)).eval()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        back = postprocess(model.decode(model.encode(preprocess(images, 8, noise=False))), 8)
    assert torch.equal(back, images)


@pytest.mark.parametrize("size,channels,levels,steps", [(8, 3, 1, 1), (8, 1, 3, 2), (16, 3, 2, 3), (32, 3, 4, 1)])
def test_latent_shapes(size, channels, levels, steps):
    model = tiny_model(image_size=size, channels=channels, levels=levels, steps=steps)
    zs = model.encode(torch.rand(2, channels, size, size) - 0.5)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes()
    assert len(zs) == levels
    assert sum(z[0].numel() for z in zs) == channels * size * size
    c, s = channels, size
    for i, z in enumerate(zs[:-1]):
        c, s = 2 * c, s // 2
        assert z.shape[1:] == (c, s, s), f"level {i}"
    assert zs[-1].shape[1:] == (4 * c, s // 2, s // 2)
    assert sum(1 for m in model.modules() if isinstance(m, FlowStep)) == levels * steps


def test_sampling_at_temperature_zero_is_deterministic():
    model = randomize(tiny_model()).eval()
    torch.manual_seed(10)
    a = model.sample(3, temperature=0.0)
    torch.manual_seed(11)
    b = model.sample(3, temperature=0.0)
    assert torch.equal(a, b)
    assert not torch.equal(model.sample(3, temperature=1.0), model.sample(3, temperature=1.0))
    assert a.shape == (3, 3, 8, 8)


def test_class_conditional_prior_and_classifier():
    cfg = tiny_cfg(y_condition=True, num_classes=4)
    model = randomize(Glow(cfg)).eval()
    x = torch.rand(3, 3, 8, 8) - 0.5
    y = torch.tensor([0, 1, 3])
    out = model(x, y)
    assert out.y_logits.shape == (3, 4)
    assert not torch.allclose(model.log_prob(x, y), model.log_prob(x, torch.tensor([2, 2, 2])))
    assert model.sample(3, 0.5, y=y).shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        model.log_prob(x, torch.tensor([0, 1, 4]))


def test_actnorm_init_gives_zero_mean_unit_variance_and_is_saved():
    torch.manual_seed(6)
    model = tiny_model()
    x = torch.rand(64, 3, 8, 8) - 0.5
    outputs = []
    first = model.levels[0].steps[0].actnorm
    handle = first.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    model.initialize(x)
    handle.remove()
    assert model.is_initialized
    y = outputs[0]
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(12), atol=1e-3, rtol=0)
    # The flag is a buffer: a fresh model loading this state is initialized and is not re-initialized.
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.initialize(torch.rand(8, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_actnorm_init_from_summed_statistics_equals_init_on_concatenated_batch():
    """What the trainer does across ranks: each 'rank' contributes sums; the result equals one big batch."""
    torch.manual_seed(7)
    reference = tiny_model()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    part_a, part_b = torch.rand(5, 3, 8, 8) - 0.5, torch.rand(7, 3, 8, 8) - 0.5
    reference.initialize(torch.cat([part_a, part_b]))

    ranks = [tiny_model(), tiny_model()]
    for m in ranks:
        m.load_state_dict(state)
    # Simulate an all-reduce: run both "ranks" in lockstep, summing their statistics layer by layer.
    layers = [list(m.actnorms()) for m in ranks]
    for i in range(len(layers[0])):
        stats = []
        for model, layer_list, part in zip(ranks, layers, (part_a, part_b), strict=True):
            captured = []
            hook = layer_list[i].register_forward_pre_hook(lambda mod, args, c=captured: c.append(args[0]))
            with torch.no_grad():
                model(part)
            hook.remove()
            stats.append(ActNorm.init_statistics(captured[0]))
        for layer_list in layers:
            layer_list[i].initialize_from_statistics(stats[0] + stats[1])
    for m in ranks:
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kw", [{}, {"coupling": "additive", "invconv": "plain"},
                                {"y_condition": True, "num_classes": 3}])
def test_gradient_checkpointing_gives_same_gradients(kw):
    """Checkpointed segments recompute without restoring any RNG state (preserve_rng_state=False): the gradients
    are still plain backprop's."""
    torch.manual_seed(8)
    plain = randomize(tiny_model(**kw))
    ckpt = tiny_model(memory="checkpoint", **kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 8, 8) - 0.5
    y = torch.tensor([0, 1, 2, 1]) if kw.get("y_condition") else None
    for m in (plain, ckpt):
        m.train()
        m.log_prob(x, y).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_reduces_bits_per_dim():
    torch.manual_seed(9)
    model = tiny_model(image_size=8, channels=1, levels=2, steps=2, width=16)
    # Each image is one random grey level plus small noise: 5 bits/dim marginally, far less jointly.
    base = torch.randint(0, 224, (64, 1, 1, 1))
    images = (base + torch.randint(0, 32, (64, 1, 8, 8))).to(torch.uint8)
    model.initialize(preprocess(images, 5))
    opt = torch.optim.Adamax(model.parameters(), lr=3e-3)
    start = bits_per_dim(model, images).mean().item()
    for _ in range(40):
        opt.zero_grad()
        loss = bits_per_dim(model, images).mean()
        loss.backward()
        opt.step()
    end = bits_per_dim(model, images).mean().item()
    assert end < start - 0.5, (start, end)
