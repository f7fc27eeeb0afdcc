"""Invertible recomputation: backprop through a chain of flow steps while storing only the chain's output.

Every flow step is invertible, so its input can be rebuilt from its output during backward instead of being kept
from the forward pass. `invertible_flow(steps, x)` runs the chain under no_grad and saves only its output y; its
backward walks the steps from last to first and, for each one,

    x = step.reverse(y)                          # rebuild the input (no graph)
    y', logdet' = step(x)                        # re-run the step with grad enabled: one step's graph at a time
    grad_x, grad_params = autograd.grad((y', logdet'), (x, params), (grad_y, grad_logdet))

so activation memory per chain is O(1) steps instead of O(K). The cost is one reverse and one extra forward per
step (about what per-step gradient checkpointing pays, plus the reverse). Parameters are inputs of the autograd
Function, so their gradients reach the usual AccumulateGrad nodes (and thus Horovod's all-reduce hooks).

The rebuilt inputs differ from the originals by float rounding that the inverse amplifies step after step; in
float64 the gradients equal plain backprop's to ~1e-12. In float32 a deep flow whose forward contracts (its inverse
expands) can amplify rounding without bound, so the chain is cut into segments (`runtime.invertible_segment` steps)
that each keep their output: memory O(K / segment) small tensors plus one step's graph, error bounded by a segment.
ActNorm's data-dependent init must have run before (it runs in `Glow.initialize`, under no_grad, where this path
is not used).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _run(steps: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logdet = x.new_zeros(x.shape[0])
    for step in steps:
        x, ld = step(x)
        logdet = logdet + ld
    return x, logdet


class _InvertibleChain(torch.autograd.Function):
    """forward(x, steps, *params) -> (y, logdet); saves y only. `params` are every parameter of `steps`, in order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, steps: nn.ModuleList, *params: torch.Tensor):
        with torch.no_grad():
            y, logdet = _run(steps, x)
        ctx.steps = steps
        ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None):
        (y,) = ctx.saved_tensors
        steps: nn.ModuleList = ctx.steps
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        grad_logdet = y.new_zeros(y.shape[0]) if grad_logdet is None else grad_logdet
        grads_per_step: list[list[torch.Tensor | None]] = []
        need_input_grad = ctx.needs_input_grad[0]
        for i in reversed(range(len(steps))):
            step = steps[i]
            with torch.no_grad():
                x = step.reverse(y)
            params = [p for p in step.parameters() if p.requires_grad]
            wants_x = i > 0 or need_input_grad
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(wants_x)
                y_re, logdet_re = step(x_in)
                inputs = ([x_in] if wants_x else []) + params
                grads = torch.autograd.grad((y_re, logdet_re), inputs, (grad_y, grad_logdet), allow_unused=True)
            if wants_x:
                grad_y, grads = grads[0], grads[1:]
            grads_per_step.append(_expand(step, params, grads))
            y = x
        param_grads = [g for step_grads in reversed(grads_per_step) for g in step_grads]
        return (grad_y if need_input_grad else None, None, *param_grads)


def _expand(step: nn.Module, trainable: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> list:
    """Gradients for every parameter of `step` (None where frozen), in `step.parameters()` order."""
    by_id = {id(p): g for p, g in zip(trainable, grads, strict=True)}
    return [by_id.get(id(p)) for p in step.parameters()]


def invertible_flow(steps: nn.ModuleList, x: torch.Tensor, segment: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain `steps` applied to x -> (y, logdet (B,)), with gradients by invertible recomputation.

    `segment` > 0 splits the chain into runs of that many steps, each keeping its own output: rounding in the
    rebuilt inputs then travels through at most `segment` steps (a deep, ill-conditioned flow in float32 otherwise
    amplifies it without bound), for one stored activation per segment. 0 keeps one output for the whole chain.
    Falls back to a plain pass when nothing needs a gradient (eval, ActNorm init), where there is nothing to save.
    """
    params = [p for step in steps for p in step.parameters()]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return _run(steps, x)
    size = segment if segment > 0 else len(steps)
    logdet = x.new_zeros(x.shape[0])
    for start in range(0, len(steps), size):
        chunk = steps[start:start + size]
        x, ld = _InvertibleChain.apply(x, chunk, *[p for step in chunk for p in step.parameters()])
        logdet = logdet + ld
    return x, logdet
