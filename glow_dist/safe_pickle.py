"""What a pickle written elsewhere may name: numpy arrays, and nothing else that runs code.

A pickle names functions and classes that the reader imports and calls, so reading one from someone else can run
anything (`os.system`, say). Files from outside are therefore read against an allowlist: plain values and containers,
plus the three numpy globals that rebuild an array. The two readers that need arrays:

- checkpoints of earlier glow-dist versions, whose `rng` entry held numpy's RNG state: glow_dist/checkpoint.py gives
  these names to torch.load(weights_only=True) as its only extra safe globals;
- the CIFAR-10 python archive (glow_dist/data/sources.py): `load_arrays_pickle`.
"""
from __future__ import annotations

import codecs
import pickle
from typing import Any, BinaryIO


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global outside the allowlist; nothing of it was executed. The message is the name."""


def numpy_array_globals() -> dict[str, Any]:
    """Name -> object, for exactly what a numpy array needs: the globals its pickle names, under numpy 1's and numpy
    2's module names (`numpy.core` became `numpy._core`; files written with either must load), and the class of the
    one dtype old checkpoints hold (uint32, numpy's MT19937 state), which torch's loader checks before it sets a
    dtype's state."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    uint32 = type(np.dtype(np.uint32))
    return {"numpy.core.multiarray._reconstruct": _reconstruct, "numpy._core.multiarray._reconstruct": _reconstruct,
            "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, f"{uint32.__module__}.{uint32.__qualname__}": uint32}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # _codecs.encode: how a protocol-2 pickle written by Python 3 spells bytes (torch's loader allows it too).
        found = {**numpy_array_globals(), "_codecs.encode": codecs.encode}.get(f"{module}.{name}")
        if found is None:
            raise UnsafePickleError(f"{module}.{name}")
        return found


def load_arrays_pickle(file: BinaryIO, encoding: str = "ASCII") -> Any:
    """pickle.load(file) that builds only plain values, containers, bytes and numpy arrays; UnsafePickleError (naming
    the global) before anything else would be imported or called."""
    return _ArraysOnly(file, encoding=encoding).load()
