"""The sampling/decoding component (glow_dist/decoder.py): every mode gives the eager images.

CPU tests use the tiny debug model (one torch.compile of the sampling function for the module); `gpu` tests run
only where CUDA is present (conftest skips them elsewhere).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opcount import OpCounter

from glow_dist.config import ConfigError, load_config
from glow_dist.inference.decoding import Decoder, sample_images
from glow_dist.model import Glow, build_model
from glow_dist.runtime import resolve_mode

REPO = Path(__file__).resolve().parents[1]
TEMPERATURES = (0.0, 0.7, 1.0)


def trained_like_model(device: str = "cpu", **overrides: object) -> Glow:
    """The debug model with every weight moved off its init (zero couplings and priors would hide mistakes)."""
    cfg = load_config(REPO / "configs/debug.yaml", [f"model.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False).to(device)


def assert_images_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """CUDA: the same kernels as eager, but TF32 convolutions may pick other algorithms in another context; a stale
    buffer or a wrong input differs by O(0.1)."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def compiled_sampling() -> tuple[Glow, Decoder, list[str], list[tuple[float, torch.Tensor]]]:
    """A compiled decoder's samples at several temperatures, 5 images in chunks of 4 (the last one padded)."""
    model = trained_like_model()
    logs: list[str] = []
    decoder = Decoder(model, "compiled", log=logs.append)
    samples = [(t, decoder.sample(5, t, seed=3, batch_size=4)) for t in TEMPERATURES]
    return model, decoder, logs, samples


def test_compiled_sampling_gives_the_eager_images(compiled_sampling):
    model, decoder, logs, samples = compiled_sampling
    assert decoder.mode == "compiled" and logs == []   # no fallback: the images below really are the compiled ones
    eager = Decoder(model, "eager")
    for t, images in samples:
        assert images.shape == (5, 1, 8, 8)
        assert_images_close(images, eager.sample(5, t, seed=3, batch_size=4))
    # The draws depend on the seed alone: not on the chunking, and not on the temperature's row.
    assert_images_close(samples[1][1], eager.sample(5, 0.7, seed=3))
    assert not torch.allclose(samples[1][1], eager.sample(5, 0.7, seed=4))
    # Weights updated in place (the trainer's optimizer and EMA) are read by the next call, not baked in.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    assert_images_close(decoder.sample(5, 0.7, seed=3, batch_size=4), eager.sample(5, 0.7, seed=3, batch_size=4))
    assert decoder.mode == "compiled" and logs == []


def test_compiled_sampling_dispatches_fewer_operators(compiled_sampling):
    model, decoder, _, _ = compiled_sampling
    eager = Decoder(model, "eager")
    with OpCounter() as eager_ops:
        eager.sample(4, 0.7, batch_size=4)
    with OpCounter() as compiled_ops:
        decoder.sample(4, 0.7, batch_size=4)
    assert decoder.mode == "compiled"
    assert compiled_ops.total < 0.6 * eager_ops.total, (compiled_ops.total, eager_ops.total)


def test_a_wrong_fast_path_falls_back_to_eager_with_one_log_line():
    model = trained_like_model()
    logs: list[str] = []
    decoder = Decoder(model, "compiled", log=logs.append)
    # Stand-in for a miscompiled function (no compilation needed): it ignores the temperature.
    decoder._compiled["sample"] = lambda m, eps, t, y: m.decode_noise(eps, 1.0, y)
    images = decoder.sample(3, 0.5, seed=1)
    assert decoder.mode == "eager"
    assert len(logs) == 1 and "compiled sample differs from eager" in logs[0], logs
    assert_images_close(images, Decoder(model, "eager").sample(3, 0.5, seed=1))

    logs.clear()
    broken = Decoder(model, "compiled", log=logs.append)
    broken._compiled["decode"] = lambda *args: (_ for _ in ()).throw(RuntimeError("no C++ compiler"))
    zs = model.encode(images)
    assert_images_close(broken.decode(zs), images)
    assert broken.mode == "eager" and len(logs) == 1 and "no C++ compiler" in logs[0], logs


def test_eager_decoder_inverts_encode_and_keeps_sample_images_deterministic():
    model = trained_like_model()
    decoder = Decoder(model, "eager")
    x = decoder.sample(6, 0.8, seed=0)
    assert_images_close(decoder.decode(model.encode(x), batch_size=4), x)
    a = sample_images(model, 6, 0.8, seed=0, batch_size=4)
    assert torch.equal(a, sample_images(decoder, 6, 0.8, seed=0))
    assert a.dtype == torch.uint8


def test_graphed_mode_falls_back_to_eager_on_cpu_with_one_log_line():
    logs: list[str] = []
    decoder = Decoder(trained_like_model(), "graphed", log=logs.append)
    assert decoder.mode == "eager"
    assert len(logs) == 1 and "CUDA graphs need a CUDA device" in logs[0]
    assert resolve_mode("auto", torch.device("cpu")) == ("eager", "")
    assert resolve_mode("auto", torch.device("cuda")) == ("graphed", "")


def test_sample_mode_config_key():
    assert load_config(None).runtime.sample_mode == "auto"
    assert load_config(None, ["runtime.sample_mode=graphed"]).runtime.sample_mode == "graphed"
    with pytest.raises(ConfigError, match="runtime.sample_mode"):
        load_config(None, ["runtime.sample_mode=fast"])


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{}, {"y_condition": "true"}, {"coupling": "additive", "invconv": "plain"}])
def test_graphed_decoding_gives_the_eager_images_on_cuda(overrides):
    model = trained_like_model("cuda", **overrides)
    logs: list[str] = []
    graphed, eager = Decoder(model, "graphed", log=logs.append), Decoder(model, "eager")
    for t in TEMPERATURES:
        close(graphed.sample(5, t, seed=3, batch_size=4), eager.sample(5, t, seed=3, batch_size=4))
    x = eager.sample(7, 0.7, seed=5)
    zs = model.encode(x, torch.zeros(7, dtype=torch.long, device="cuda") if model.cfg.y_condition else None)
    close(graphed.decode(zs, batch_size=4), eager.decode(zs, batch_size=4))
    assert graphed.mode == "graphed", logs
    assert len(graphed._graphs) == 2   # one sample graph (chunk 4) and one decode graph, reused for every call
    assert all("captured" in line for line in logs), logs


@pytest.mark.gpu
def test_graph_replays_read_new_inputs_and_weights_on_cuda():
    """No stale buffers: each replay decodes the latents, temperature and weights of its own call."""
    model = trained_like_model("cuda")
    graphed, eager = Decoder(model, "graphed"), Decoder(model, "eager")
    first = graphed.sample(4, 0.7, seed=1)
    second = graphed.sample(4, 0.7, seed=2)
    hotter = graphed.sample(4, 1.0, seed=2)
    assert not torch.allclose(first, second) and not torch.allclose(second, hotter)
    close(second, eager.sample(4, 0.7, seed=2))
    close(hotter, eager.sample(4, 1.0, seed=2))
    zs_a, zs_b = model.encode(first), model.encode(second)
    decoded_a, decoded_b = graphed.decode(zs_a), graphed.decode(zs_b)
    assert not torch.allclose(decoded_a, decoded_b)
    close(decoded_a, eager.decode(zs_a))
    close(decoded_b, eager.decode(zs_b))
    # The graph reads the parameters in place, as the trainer's optimizer and EMA update them.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    close(graphed.sample(4, 0.7, seed=2), eager.sample(4, 0.7, seed=2))
    assert graphed.mode == "graphed"
