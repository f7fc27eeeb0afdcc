"""`make_loader`: the trainer's one entry point to the data. It chooses the backend (`data.backend`) and where
images are decoded (`data.decode`); the backends share their types through `glow_dist.data.base` only.

- backend auto: DALI when it can be imported, else webdataset; `dali` without DALI is an error.
- decode auto: on the GPU (DALI's "mixed" decoder, on the rank's own GPU) when the backend is DALI and the device
  is CUDA, else on the CPU. `gpu` without a CUDA device or without DALI is an error; `cpu` always works.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data.base import Batch, Loader, decode_sample, epoch_seed, read_range
from glow_dist.data.manifest import DataError, check_model_shape, read_manifest, split_shards

__all__ = ["Batch", "Loader", "epoch_seed", "iter_samples", "make_loader", "resolve_backend", "resolve_decode"]


def make_loader(data_cfg: DataConfig, model_cfg: ModelConfig, split: str, rank: int, world_size: int,
                batch_size: int, device: torch.device | str, seed: int) -> Loader:
    """The loader of `split` for this rank; checks the data set against the model's image size and channels."""
    manifest = read_manifest(data_cfg.root)
    check_model_shape(manifest, model_cfg.image_size, model_cfg.channels, data_cfg.root)
    device = torch.device(device)
    backend = resolve_backend(data_cfg.backend)
    decode = resolve_decode(data_cfg.decode, backend, device)
    cls: type[Loader]
    if backend == "dali":
        from glow_dist.data.dali_loader import DaliLoader as cls
    else:
        from glow_dist.data.wds_loader import WdsLoader as cls
    return cls(data_cfg.root, manifest, split, rank, world_size, batch_size, device, seed,
               flip=data_cfg.flip, num_workers=data_cfg.num_workers, shuffle_buffer=data_cfg.shuffle_buffer,
               n_bits=model_cfg.n_bits, decode=decode)


def resolve_backend(backend: str) -> str:
    """auto -> dali when it can be imported, else webdataset; an explicit `dali` without DALI is an error."""
    if backend == "webdataset":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if backend == "dali":
            raise DataError("data.backend=dali but nvidia-dali is not installed; `pip install nvidia-dali-cuda120` "
                            "(or -cuda130) or set data.backend=webdataset") from None
        return "webdataset"
    return "dali"


def resolve_decode(decode: str, backend: str, device: torch.device) -> str:
    """`cpu` or `gpu`: where the images of this loader are decoded (see the module docstring)."""
    if decode == "gpu":
        if device.type != "cuda":
            raise DataError(f"data.decode=gpu but this rank's device is {device} (no CUDA device); "
                            "set data.decode=auto or cpu")
        if backend != "dali":
            raise DataError("data.decode=gpu needs the DALI backend (data.backend=dali or auto with nvidia-dali "
                            "installed); the webdataset backend decodes on the CPU")
        return "gpu"
    if decode == "auto" and backend == "dali" and device.type == "cuda":
        return "gpu"
    return "cpu"


def iter_samples(root: str | Path, split: str) -> Iterator[tuple[np.ndarray, int, dict[str, int]]]:
    """Every sample of `split` in file order: (uint8 (H, W, C) image, label or -1, {attribute: +1/-1})."""
    manifest = read_manifest(root)
    shards = split_shards(manifest, root, split)
    total = sum(s["num_samples"] for s in shards)
    ext = manifest["image_ext"]
    for sample in read_range(shards, 0, total, [ext, "cls", "json"]):
        image, label = decode_sample(sample, ext, manifest["image_size"], manifest["channels"])
        attrs = json.loads(sample["json"]).get("attrs", {}) if "json" in sample else {}
        yield image, label, attrs
