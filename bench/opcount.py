"""Count the ATen operators a piece of code dispatches: the launch proxy for GPU speed.

On a GPU nearly every ATen operator is one or more kernel launches, and a Glow training step of small layers is
bound by launching them (issue 13), so the number of operators per step, countable on any CPU, predicts how far a
step is from being compute-bound. Compiled (Inductor) kernels and CUDA-graph replays do not pass through the
dispatcher, so they count as the operators they still call (convolutions, extern matmuls, copies).

    with OpCounter() as ops:
        step()
    print(ops.total, ops.most_common(10))
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts every ATen operator called under it (forward, backward and optimizer alike).

    `total` counts operators that may run a kernel; `views` counts pure views/reshapes (aten.view, aten.t, ...),
    which cost only a little host time. Autograd's backward, run by the engine, is seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.views = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this torch.compile refuses to run under the mode (it would run eagerly and count eager's ops);
        # with it, compiled code runs as compiled, and the mode sees the operators its kernels still dispatch.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatcher's signature
        if _is_view(func):
            self.views += 1
        else:
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def most_common(self, n: int = 10) -> list[tuple[str, int]]:
        return self.counts.most_common(n)


def _is_view(func: torch._ops.OpOverload) -> bool:
    schema = func._schema
    # A view returns an alias of an input and writes nothing: e.g. aten.view, aten.t, aten.expand, aten.slice.
    returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    return returns_alias and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
