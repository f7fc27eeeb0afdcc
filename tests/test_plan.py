"""`glow-dist plan`: counts from the meta-device module tree, FLOPs and saved-activation bytes, epoch arithmetic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from glow_dist.config import load_config
from glow_dist.model import build_model, measure_activations, meta_model
from glow_dist.model.layers import FlowStep, InvConv1x1LU
from glow_dist.preflight.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def test_meta_model_matches_the_real_model_and_allocates_nothing():
    cfg = load_config(REPO / "configs" / "debug.yaml")
    meta, real = meta_model(cfg.model), build_model(cfg.model)
    assert all(p.is_meta for p in meta.parameters())
    assert [(k, v.shape) for k, v in meta.state_dict().items()] == [(k, v.shape) for k, v in real.state_dict().items()]


def test_celeba_hq_config_is_near_the_papers_200m_parameters():
    cfg = load_config(REPO / "configs" / "celeba_hq_256.yaml")
    params = sum(p.numel() for p in meta_model(cfg.model).parameters())
    assert 150e6 < params < 230e6, params
    assert cfg.runtime.memory == "checkpoint" and cfg.train.batch_size == 1 and cfg.train.init_batch_size == 4


def test_forward_flops_equal_the_convolutions_counted_from_module_shapes(monkeypatch: pytest.MonkeyPatch):
    cfg = load_config(REPO / "configs" / "debug.yaml")
    plan = make_plan(cfg, world_size=2, given_dataset_size=1000)
    # Independent count on a real CPU model: 2 * MACs of every conv at its output size, plus the LU 1x1 convs
    # (a CxC conv per pixel and the two CxC matmuls that assemble W).
    model, expected = build_model(cfg.model), 0

    def conv_hook(m: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        nonlocal expected
        expected += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    def invconv_hook(m: InvConv1x1LU, args: tuple, out: tuple) -> None:
        nonlocal expected
        c = m.log_s.shape[0]
        expected += 2 * out[0].numel() * c + 2 * (2 * c ** 3)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, InvConv1x1LU):
            m.register_forward_hook(invconv_hook)
    # The layer-by-layer path, so that every 1x1 conv runs as its module (the default path folds ActNorm's scale
    # into the 1x1 conv's weight: the same convolutions, but the LU module's forward hook would not fire).
    monkeypatch.setattr(FlowStep, "forward", FlowStep.forward_layers)
    model(torch.rand(1, cfg.model.channels, cfg.model.image_size, cfg.model.image_size) - 0.5)
    assert plan.forward_flops == expected
    assert 2.0 * plan.forward_flops < plan.train_flops_plain <= 3.0 * plan.forward_flops
    # Checkpointing recomputes the flow steps' forward during backward: at most one extra forward.
    assert plan.train_flops_plain < plan.train_flops_checkpoint <= plan.train_flops_plain + plan.forward_flops


def test_activation_memory_scales_with_batch_and_checkpointing_saves_it():
    cfg = load_config(REPO / "configs" / "celeba_hq_256.yaml", ["model.levels=3", "model.steps=4", "model.width=64",
                                                                "model.image_size=64"])
    one, four = measure_activations(cfg.model, 1), measure_activations(cfg.model, 4)
    assert 3.5 * one["plain"] < four["plain"] <= 4 * one["plain"]  # per-image tensors, plus a few LU weights
    for saved in (one, four):
        # Checkpointing keeps every step's input, invertible recomputation only each level's output.
        assert saved["invertible"] < saved["checkpoint"] < saved["plain"] / 3

def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glow_dist", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_reads_the_data_set_size_from_the_manifest(digits_shards):
    out = plan_cli("--config", "configs/digits.yaml", "--np", "2", f"data.root={digits_shards}", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    n_train = json.loads((digits_shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    assert plan["dataset_size"] == n_train and plan["global_batch"] == 64
    assert plan["steps_per_epoch"] == (n_train // 2) // 32
    text = plan_cli("--config", "configs/digits.yaml", "--np", "2", f"data.root={digits_shards}").stdout
    assert f"{n_train:,} train images" in text and "32 per rank x 2 ranks = 64 global" in text


def test_cli_without_manifest_says_unknown_or_uses_dataset_size(tmp_path):
    base = ["--config", "configs/debug.yaml", "--np", "4", f"data.root={tmp_path / 'none'}"]
    unknown = plan_cli(*base)
    assert unknown.returncode == 0, unknown.stderr
    assert "steps/epoch  unknown" in unknown.stdout and "--dataset-size" in unknown.stdout
    given = plan_cli(*base, "--dataset-size", "27000")
    assert "27,000 train images (--dataset-size)" in given.stdout and "steps/epoch  843;" in given.stdout
    bad = plan_cli(*base, "--np", "0")
    assert bad.returncode == 2 and "--np must be at least 1" in bad.stderr


@pytest.mark.slow
def test_celeba_hq_plan_at_40_ranks():
    out = plan_cli("--config", "configs/celeba_hq_256.yaml", "--np", "40", "--dataset-size", "27000", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["global_batch"] == 40 and plan["steps_per_epoch"] == 675
    assert plan["activation_bytes"]["checkpoint"] < plan["activation_bytes"]["plain"] / 10
    assert 0.3e12 < plan["forward_flops"] < 0.7e12  # about 240 GMACs per 256x256 image
