"""What training a model keeps in memory, measured on the meta device, and `runtime.memory: auto` from it.

    saved = measure_activations(cfg.model, batch=16)   # {"plain": bytes, "checkpoint": ..., "invertible": ...}
    memory, why = resolve_memory(cfg.runtime.memory, cfg.model, batch=16, capacity=device_memory_bytes(device))

The measurement is `glow-dist plan`'s (glow_dist/preflight/plan.py prints it for a config); it lives here, beside
the model it measures, so that the trainer can resolve `auto` with the same numbers.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import nn

from glow_dist.config import ModelConfig, RuntimeConfig
from glow_dist.model.glow import meta_model
from glow_dist.model.layers import FlowStep

# Per parameter, a training rank holds fp32 weights, gradients, two Adam(ax) moments and the EMA copy.
STATE_COPIES = 5
# memory=auto picks plain when the estimate (saved activations + training state) is at most this fraction of the
# device: the rest covers what the estimate leaves out (backward's transient gradients, cuDNN workspaces, the CUDA
# context, the allocator's slack, a captured graph's copies). Issue 25 reports the CelebA-HQ architecture at batch 16
# in plain mode at 48 GiB on an H100, where this estimate says 48.0 GiB (not re-measured: no GPU in that work).
AUTO_PLAIN_FRACTION = 0.75


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # one key per storage, so views and in-place results count once


def measure_activations(cfg: ModelConfig, batch: int) -> dict[str, int]:
    """Bytes saved for backward by one forward at `batch` images, per memory mode, measured on the meta device.

    plain keeps everything. checkpoint keeps each flow step's input; invertible only each level's chain output.
    Both also keep what is saved outside the steps, and rebuild one step's activations at a time during backward.
    """
    # Class labels are only read by tiny linear layers, and the label range check cannot run on meta tensors.
    model = meta_model(dataclasses.replace(cfg, y_condition=False), RuntimeConfig(memory="plain"))
    weights = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[int, int | None]] = {}   # storage -> (bytes, index of the flow step that saved it)
    inputs: dict[int, int] = {}                      # storage -> bytes, of each flow step's input
    outputs: list[tuple[int, int]] = []              # (storage, bytes) of each flow step's output
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weights and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    def enter(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        current[0] = len(outputs)
        inputs[_storage_key(args[0])] = args[0].untyped_storage().nbytes()

    def leave(module: nn.Module, args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        current[0] = None
        outputs.append((_storage_key(out[0]), out[0].untyped_storage().nbytes()))

    steps = [m for m in model.modules() if isinstance(m, FlowStep)]  # in execution order
    hooks = [h for s in steps for h in (s.register_forward_pre_hook(enter), s.register_forward_hook(leave))]
    x = torch.empty(batch, cfg.channels, cfg.image_size, cfg.image_size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in hooks:
        h.remove()

    per_step = [0] * len(steps)
    outside: dict[int, int] = {}
    for key, (nbytes, owner) in saved.items():
        if owner is None:
            outside[key] = nbytes
        else:
            per_step[owner] += nbytes
    last_steps = list(itertools.accumulate(cfg.steps for _ in range(cfg.levels)))  # 1-based: K, 2K, ...
    chain_outputs = dict(outputs[i - 1] for i in last_steps)
    one_step = max(per_step, default=0)
    return {"plain": sum(nbytes for nbytes, _ in saved.values()),
            "checkpoint": sum({**outside, **inputs}.values()) + one_step,
            "invertible": sum({**outside, **chain_outputs}.values()) + one_step}


def _weight_and_buffer_bytes(cfg: ModelConfig) -> tuple[int, int]:
    model = meta_model(cfg)
    return (sum(p.numel() * p.element_size() for p in model.parameters()),
            sum(b.numel() * b.element_size() for b in model.buffers()))


def state_bytes(cfg: ModelConfig) -> int:
    """Bytes of a training rank's model state: weights, gradients, optimizer moments, EMA copy, buffers."""
    weights, buffers = _weight_and_buffer_bytes(cfg)
    return STATE_COPIES * weights + buffers


def checkpoint_bytes(cfg: ModelConfig) -> int:
    """Bytes of a checkpoint's tensors: weights and buffers twice (the model and its EMA copy), and two optimizer
    moments per weight. Rank 0 holds one more copy of them in host memory for asynchronous checkpoints."""
    weights, buffers = _weight_and_buffer_bytes(cfg)
    return 4 * weights + 2 * buffers


def resolve_memory(asked: str, cfg: ModelConfig, batch: int, capacity: int) -> tuple[str, str]:
    """(memory mode, why) for `runtime.memory`: auto is plain (no recompute) when saved activations plus training
    state at `batch` fit in AUTO_PLAIN_FRACTION of `capacity` bytes (one rank's share of its device), else checkpoint
    (each flow step's input only; about one extra forward). Other values are returned as asked, with why ""."""
    if asked != "auto":
        return asked, ""
    need = measure_activations(cfg, batch)["plain"] + state_bytes(cfg)
    mode = "plain" if need <= AUTO_PLAIN_FRACTION * capacity else "checkpoint"
    return mode, (f"auto: plain mode needs about {_size(need)} at batch {batch} (activations + training state), "
                  f"{'within' if mode == 'plain' else 'more than'} {AUTO_PLAIN_FRACTION:.0%} of {_size(capacity)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def resolved_runtime(runtime: RuntimeConfig, cfg: ModelConfig, batch: int,
                     capacity: int) -> tuple[RuntimeConfig, str]:
    """`runtime` with `memory` resolved (a copy when it was auto), and the line saying what auto chose."""
    memory, why = resolve_memory(runtime.memory, cfg, batch, capacity)
    return (dataclasses.replace(runtime, memory=memory) if memory != runtime.memory else runtime), why
