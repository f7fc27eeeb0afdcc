"""What a config costs before a GPU is touched: parameters, FLOPs, activation memory, batch and epoch arithmetic.

    plan = make_plan(load_config("configs/celeba_hq_256.yaml"), world_size=40)
    print(format_plan(plan))

The model is built on PyTorch's meta device (shapes only, no storage), so even the 200M-parameter CelebA-HQ
model plans in seconds on a laptop. Every number is measured on the real module tree:
- parameters: `model.parameters()` of the meta model;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of one image (convolutions and
  matmuls; elementwise ops are not counted, as is usual);
- activations: bytes of the tensors autograd saves for backward (`saved_tensors_hooks`), at the per-rank batch,
  for every memory mode: measured in plain mode, then split into what each mode keeps
  (glow_dist/model/memory.py, which `runtime.memory: auto` uses too). Gradient buffers, cuDNN workspaces and the
  allocator's slack come on top.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from glow_dist.config import Config, ModelConfig, RuntimeConfig
from glow_dist.data.manifest import MANIFEST, read_manifest, train_batches
from glow_dist.data.object_store import is_url
from glow_dist.data.shard_cache import remote_manifest
from glow_dist.model import meta_model
from glow_dist.model.layers import InvConv1x1, InvConv1x1LU
from glow_dist.model.memory import checkpoint_bytes, measure_activations, state_bytes


@dataclass
class Plan:
    world_size: int
    parameters: int
    conv_layers: int              # nn.Conv2d modules (coupling networks and split priors)
    invconv_layers: int           # invertible 1x1 convolutions
    forward_flops: int            # per image
    train_flops_plain: int        # per image, forward + backward
    train_flops_checkpoint: int   # per image, forward + backward + the recomputed forward of every step
    activation_bytes: dict[str, int]  # per rank at train.batch_size, by runtime.memory mode
    state_bytes: int              # per rank: weights, gradients, optimizer moments, EMA, buffers
    checkpoint_bytes: int         # a checkpoint's tensors; rank 0's host copy for asynchronous checkpoints too
    batch_size: int               # per rank
    global_batch: int
    dataset_size: int | None
    dataset_source: str           # where dataset_size came from
    steps_per_epoch: int | None
    epochs: float | None          # train.steps in epochs


def measure_flops(cfg: ModelConfig, memory: str) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs for one image; with memory=checkpoint backward includes the recompute."""
    model = meta_model(dataclasses.replace(cfg, y_condition=False), RuntimeConfig(memory=memory))
    x = torch.empty(1, cfg.channels, cfg.image_size, cfg.image_size, device="meta", requires_grad=False)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        forward = counter.get_total_flops()
        (-out.log_prob.sum()).backward()
    return forward, counter.get_total_flops()


def dataset_size(cfg: Config, given: int | None) -> tuple[int | None, str]:
    """Training images: an explicit --dataset-size, else data.root's manifest, else unknown."""
    if given is not None:
        return given, "--dataset-size"
    if is_url(cfg.data.root):
        return remote_manifest(cfg.data.root)["splits"]["train"]["num_samples"], f"{cfg.data.root}/{MANIFEST}"
    if (Path(cfg.data.root) / MANIFEST).is_file():
        manifest = read_manifest(cfg.data.root)
        return manifest["splits"]["train"]["num_samples"], str(Path(cfg.data.root) / MANIFEST)
    return None, f"no {Path(cfg.data.root) / MANIFEST}; pass --dataset-size"


def make_plan(cfg: Config, world_size: int, given_dataset_size: int | None = None) -> Plan:
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    model = meta_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    forward, plain_step = measure_flops(cfg.model, "plain")
    _, checkpoint_step = measure_flops(cfg.model, "checkpoint")
    n, source = dataset_size(cfg, given_dataset_size)
    per_epoch = train_batches(n, world_size, cfg.train.batch_size) if n is not None else None
    return Plan(
        world_size=world_size, parameters=params,
        conv_layers=sum(isinstance(m, nn.Conv2d) for m in model.modules()),
        invconv_layers=sum(isinstance(m, (InvConv1x1, InvConv1x1LU)) for m in model.modules()),
        forward_flops=forward, train_flops_plain=plain_step, train_flops_checkpoint=checkpoint_step,
        activation_bytes=measure_activations(cfg.model, cfg.train.batch_size),
        state_bytes=state_bytes(cfg.model), checkpoint_bytes=checkpoint_bytes(cfg.model),
        batch_size=cfg.train.batch_size, global_batch=cfg.train.batch_size * world_size,
        dataset_size=n, dataset_source=source, steps_per_epoch=per_epoch,
        epochs=cfg.train.steps / per_epoch if per_epoch else None,
    )


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _flops(n: int) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,} FLOP"


def format_plan(plan: Plan, cfg: Config, title: str) -> str:
    m = cfg.model
    activations = ", ".join(f"{_bytes(n)} {mode}" for mode, n in plan.activation_bytes.items())
    if plan.steps_per_epoch is None:
        epochs = "unknown (data set size unknown)"
    elif plan.steps_per_epoch == 0:
        epochs = f"0 (fewer than {plan.global_batch} images per global batch)"
    else:
        epochs = f"{plan.steps_per_epoch:,}; train.steps={cfg.train.steps:,} is {plan.epochs:,.1f} epochs"
    rows = [
        ("model", f"{m.image_size}x{m.image_size}x{m.channels}, {m.n_bits} bits, L={m.levels} K={m.steps} "
                  f"width={m.width}, {m.coupling} coupling, {m.invconv} 1x1 convs, memory={cfg.runtime.memory}"),
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e6:.1f}M) in {plan.conv_layers} conv layers "
                       f"+ {plan.invconv_layers} invertible 1x1 convs"),
        ("flops/image", f"forward {_flops(plan.forward_flops)}; train step {_flops(plan.train_flops_plain)} plain, "
                        f"{_flops(plan.train_flops_checkpoint)} with checkpointing (recompute)"),
        ("activations", f"per rank at batch {plan.batch_size}: {activations} "
                        f"(saved for backward; this config: {cfg.runtime.memory})"),
        ("model state", f"per rank: {_bytes(plan.state_bytes)} (weights, grads, 2 optimizer moments, EMA, buffers)"),
        ("checkpoint", f"{_bytes(plan.checkpoint_bytes)} per file (weights, EMA, 2 optimizer moments); "
                       + (f"rank 0 holds one more copy in host memory, {_bytes(plan.checkpoint_bytes)}, to write it "
                          "in the background (train.async_checkpoint)" if cfg.train.async_checkpoint
                          else "written while training waits (train.async_checkpoint=false)")),
        ("batch", f"{plan.batch_size} per rank x {plan.world_size} ranks = {plan.global_batch} global; "
                  f"ActNorm init {cfg.train.init_batch_size} per rank = {cfg.train.init_batch_size * plan.world_size}"),
        ("data", f"{plan.dataset_size:,} train images ({plan.dataset_source})" if plan.dataset_size is not None
                 else f"unknown ({plan.dataset_source})"),
        ("steps/epoch", epochs),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])


def plan_json(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), indent=2)
