"""Data: `glow-dist prepare` writes WebDataset shards; `make_loader` reads them on every rank.

    from glow_dist.data import make_loader, read_manifest, iter_samples, DataError
    loader = make_loader(cfg.data, cfg.model, split="train", rank=r, world_size=w, batch_size=b, device=dev, seed=s)
    for images, labels in loader.epoch(epoch, start_batch=0):   # uint8 (B, C, H, W), int64 (B,) on `device`
        ...

Two backends behind one interface (`data.backend`): `dali` (DALI's webdataset reader with the index files,
decoding on the GPU when the device is CUDA) and `webdataset` (webdataset + PIL in a DataLoader). Attributes
(CelebA-style, +1/-1) are not part of training batches; `iter_samples(root, split)` yields
(uint8 HWC image, label, {attribute: +1/-1}) in file order for the latent-manipulation tools.

Damaged data: `verify.verify_split` checks shards against manifest.json (sha256, sample counts) and every sample's
header (`samples.check_sample`) before training; the loaders read each bad sample as a deterministic substitute
(`Loader.decode_or_substitute`, DALI through patched index files) and report the ones they meet
(`Loader.take_bad_samples`). The trainer's side of it is glow_dist/training/data_health.py.

Roots that are URLs (s3://bucket/prefix, http(s)://host/path): `shard_cache.open_root` turns them into a folder on
this node, the cache (data.cache=auto) or the index files of a streamed data set (never); the stores themselves are
object_store.py (HTTP), s3_store.py (boto3) and remote.py (opening them, webdataset's handlers); `prepare --out
s3://...` uploads through publish.py.

The loaders (and torch, DALI) are imported on first use so that the CLI starts fast.
"""
from __future__ import annotations

from typing import Any

from glow_dist.data.manifest import DataError, read_manifest

__all__ = ["DataError", "iter_samples", "make_loader", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name in ("make_loader", "iter_samples", "Loader"):
        from glow_dist.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'glow_dist.data' has no attribute {name!r}")
