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
from glow_dist.data.shard_cache import local_root
from glow_dist.data.verify import BadSample, verify_split

__all__ = ["Batch", "Loader", "data_classes", "epoch_seed", "iter_samples", "make_loader", "resolve_backend",
           "resolve_decode"]


def make_loader(data_cfg: DataConfig, model_cfg: ModelConfig, split: str, rank: int, world_size: int,
                batch_size: int, device: torch.device | str, seed: int, bad_samples: list[BadSample] | None = None,
                batch_key: str = "train.batch_size") -> Loader:
    """The loader of `split` for this rank; checks the data set against the model's image size and channels.
    `bad_samples`: what the start-up scan found (verify.py), read as their substitutes (None: the DALI backend scans
    the split itself, cached like data.verify=auto, since its decoder must never see a bad sample); `batch_key`: the
    config key that set `batch_size`, for the message when the split is too small for it."""
    root = local_root(data_cfg)   # a URL root: this node's cache, or the index files for streaming
    manifest = read_manifest(root)
    check_model_shape(manifest, model_cfg.image_size, model_cfg.channels, data_cfg.root)
    device = torch.device(device)
    backend = resolve_backend(data_cfg.backend)
    decode = resolve_decode(data_cfg.decode, backend, device)
    streamed = manifest.get("remote", {}).get("root", "")
    if backend == "dali" and streamed and not streamed.startswith("s3://"):
        raise DataError(f"data.backend=dali streams shards from s3:// only, not {streamed}; set data.cache=auto "
                        "(the node-local cache) or data.backend=webdataset", everywhere=True)
    classes = data_classes(manifest, model_cfg, data_cfg.root)
    if bad_samples is None:
        bad_samples = verify_split(root, manifest, split, "never", classes, scan=True).bad \
            if backend == "dali" else []
    cls: type[Loader]
    if backend == "dali":
        from glow_dist.data.dali_loader import DaliLoader as cls
    else:
        from glow_dist.data.wds_loader import WdsLoader as cls
    return cls(root, manifest, split, rank, world_size, batch_size, device, seed,
               flip=data_cfg.flip, num_workers=data_cfg.num_workers, shuffle_buffer=data_cfg.shuffle_buffer,
               n_bits=model_cfg.n_bits, decode=decode, bad_samples=list(bad_samples), batch_key=batch_key,
               num_classes=classes)


def data_classes(manifest: dict, model_cfg: ModelConfig, root: str | Path) -> int:
    """The label range a sample must be in: model.num_classes for a class-conditional model (which must cover the
    data's classes), -1 (any integer) otherwise."""
    if not model_cfg.y_condition:
        return -1
    have = int(manifest.get("num_classes", 0))
    if not 0 < have <= model_cfg.num_classes:
        raise DataError(f"{root} has {have} classes, but the config asks for model.num_classes="
                        f"{model_cfg.num_classes} with model.y_condition=true; "
                        + (f"set model.num_classes={have}" if have else "prepare it with classes (--classes)"),
                        everywhere=True)
    return model_cfg.num_classes


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
    """Every sample of `split` in file order: (uint8 (H, W, C) image, label or -1, {attribute: +1/-1}). A URL root
    is read through the node's shard cache."""
    root = local_root(DataConfig(root=str(root)))
    manifest = read_manifest(root)
    shards = split_shards(manifest, root, split)
    total = sum(s["num_samples"] for s in shards)
    ext = manifest["image_ext"]
    for sample in read_range(shards, 0, total, [ext, "cls", "json"]):
        image, label = decode_sample(sample, ext, manifest["image_size"], manifest["channels"])
        attrs = json.loads(sample["json"]).get("attrs", {}) if "json" in sample else {}
        yield image, label, attrs
