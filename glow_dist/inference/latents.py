"""What users do with a trained Glow: exact encoding, decoding, interpolation and attribute manipulation.

    loaded = load_model("runs/celeba")          # glow_dist.inference.loading: EMA weights, eval mode, GPU if any
    images, names = load_images(["a.png", "b.png"], loaded.model.cfg)
    zs = encode_images(loaded.model, images)                   # one (N, C, H, W) latent per level, finest first
    assert torch.equal(decode_latents(loaded.model, zs), quantized(images, loaded.model.cfg.n_bits))
    strip = decode_latents(loaded.model, interpolate([z[:1] for z in zs], [z[1:] for z in zs], 8, "slerp"))
    direction = attribute_direction(loaded, "data/celeba64", "Smiling")   # cached beside the checkpoint
    smiling = decode_latents(loaded.model, shift(zs, direction, [-1, 0, 1]))

Every latent list has one tensor per level, finest first (`Glow.latent_shapes()`). The commands `glow-dist sample`,
`encode`, `decode`, `interpolate` and `manipulate` are thin wrappers around these functions.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from glow_dist.config import ModelConfig, architecture_differences, from_dict, to_dict
from glow_dist.files import write_atomic
from glow_dist.inference.decoding import Decoder, as_decoder
from glow_dist.inference.loading import LoadedModel
from glow_dist.model import Glow, bin_values, postprocess, preprocess, quantize

Latents = list[torch.Tensor]


class LatentError(ValueError):
    """A request the model cannot serve (unknown attribute, bad label, foreign latents, missing image)."""


def load_images(paths: Sequence[str | Path], cfg: ModelConfig) -> tuple[torch.Tensor, list[str]]:
    """uint8 (N, C, H, W) images of the model's size; others are resized/center-cropped as `prepare` does."""
    from PIL import Image

    from glow_dist.data.sources import resize_square

    arrays, names = [], []
    for p in map(Path, paths):
        if not p.is_file():
            raise LatentError(f"image {p} does not exist")
        try:
            with Image.open(p) as f:
                image = f.convert("L" if cfg.channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise LatentError(f"image {p} cannot be read: {e}") from None
        if image.size != (cfg.image_size, cfg.image_size):
            print(f"note: {p} is {image.width}x{image.height}; resized and center-cropped to "
                  f"{cfg.image_size}x{cfg.image_size} as `glow-dist prepare` does", file=sys.stderr)
            image = resize_square(image, cfg.image_size, "bicubic")
        arrays.append(np.asarray(image).reshape(cfg.image_size, cfg.image_size, cfg.channels))
        names.append(p.name)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), names


def quantized(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images as the model sees them: each value at its bin's 8-bit value (what a decode gives back)."""
    return bin_values(quantize(images, n_bits), n_bits)


def check_label(model: Glow, label: int | None) -> None:
    if label is None:
        return
    if not model.cfg.y_condition:
        raise LatentError("--label needs a class-conditional model (model.y_condition=true); this one is not")
    if not 0 <= label < model.cfg.num_classes:
        raise LatentError(f"label {label} is out of range: this model has classes 0..{model.cfg.num_classes - 1}")


def _device(model: Glow) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: Glow, images: torch.Tensor, batch_size: int = 64) -> Latents:
    """Latents of uint8 (N, C, H, W) images, taken at bin centres (no noise) so decoding gives them back exactly."""
    expected = (model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    if tuple(images.shape[1:]) != expected:
        raise LatentError(f"images are {tuple(images.shape[1:])}, the model takes (C, H, W) = {expected}")
    parts: list[Latents] = []
    for batch in images.split(batch_size):
        x = preprocess(batch.to(_device(model)), model.cfg.n_bits, noise=False)
        # The latents do not depend on the label (it only shifts the top prior), so any valid one will do.
        y = torch.zeros(len(x), dtype=torch.long, device=x.device) if model.cfg.y_condition else None
        parts.append(model.encode(x, y))
    return [torch.cat(level).cpu() for level in zip(*parts, strict=True)]


@torch.no_grad()
def decode_latents(model: Glow | Decoder, zs: Latents, batch_size: int = 64) -> torch.Tensor:
    """uint8 (N, C, H, W) images of latents (one tensor per level); `model` may be a Decoder (compiled or
    CUDA-graphed decoding, see glow_dist.inference.decoding)."""
    decoder = as_decoder(model)
    check_latent_shapes(decoder.model, [tuple(z.shape[1:]) for z in zs], "latents")
    return postprocess(decoder.decode(zs, batch_size=batch_size), decoder.model.cfg.n_bits).cpu()


def check_latent_shapes(model: Glow, shapes: Sequence[tuple[int, ...]], what: str) -> None:
    expected = [tuple(s) for s in model.latent_shapes()]
    if [tuple(s) for s in shapes] != expected:
        raise LatentError(f"{what} have per-level shapes {[tuple(s) for s in shapes]}, but this checkpoint's model "
                          f"has {expected}: they come from another model; use the checkpoint that made them")


def interpolate(za: Latents, zb: Latents, steps: int, mode: str = "linear") -> Latents:
    """`steps` points from za to zb (each a batch-1 latent list), endpoints included; slerp treats the whole latent
    as one vector, which keeps its norm (where Gaussian samples live) instead of cutting through the low-norm middle."""
    if steps < 2:
        raise LatentError(f"--steps must be at least 2 (the two endpoints), got {steps}")
    if mode not in ("linear", "slerp"):
        raise LatentError(f"interpolation mode must be linear or slerp, got {mode!r}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    a = torch.cat([z.reshape(-1) for z in za]).double()
    b = torch.cat([z.reshape(-1) for z in zb]).double()
    wa, wb = 1 - t, t
    if mode == "slerp":
        omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
        if omega > 1e-6:  # (nearly) parallel vectors: slerp is linear interpolation
            wa, wb = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)
    points = (wa[:, None] * a + wb[:, None] * b).float()
    points[0], points[-1] = a.float(), b.float()  # endpoints exactly the inputs, whatever the rounding
    return _unflatten(points, za)


def _unflatten(flat: torch.Tensor, like: Latents) -> Latents:
    sizes = [z[0].numel() for z in like]
    return [part.reshape(len(flat), *z.shape[1:]) for part, z in zip(flat.split(sizes, dim=1), like, strict=True)]


def shift(zs: Latents, direction: Latents, alphas: Sequence[float]) -> Latents:
    """For each latent of the batch, in order, `z + alpha * direction` for every alpha: N * len(alphas) latents."""
    def level(z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.cat([z[i:i + 1] + a * d for i in range(len(z)) for a in alphas])

    return [level(z, d) for z, d in zip(zs, direction, strict=True)]


def _manifest_sha(root: Path) -> str:
    return hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()


def attribute_direction(loaded: LoadedModel, data_root: str | Path, attribute: str, split: str = "train",
                        batch_size: int = 64, cache: bool = True) -> Latents:
    """mean(z | attribute) - mean(z | not attribute) over a labelled split, cached in `<ckpt>.directions/`.

    The cache is keyed by the checkpoint's sha256 and step and the data manifest's sha256 (which lists every shard's
    sha256), so retraining or re-preparing the data recomputes it.
    """
    from glow_dist.config import DataConfig
    from glow_dist.data import iter_samples, read_manifest
    from glow_dist.data.shard_cache import local_root

    root = Path(local_root(DataConfig(root=str(data_root))))   # a URL: this node's shard cache
    names = read_manifest(root).get("attribute_names", [])
    if attribute not in names:
        known = f"it has {', '.join(names)}" if names else "it has none (prepare it with `prepare folder --attributes`)"
        raise LatentError(f"unknown attribute {attribute!r} in {root}: {known}")
    key = {"checkpoint_sha256": loaded.sha256, "step": loaded.step, "manifest_sha256": _manifest_sha(root),
           "split": split}
    path = loaded.path.with_name(loaded.path.name + ".directions") / f"{attribute}.pt"
    if cache and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)   # never runs code from the file
        except Exception as e:   # refused or unreadable: recomputed, and replaced below
            print(f"note: ignoring the cached direction {path}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return list(saved["direction"])
    print(f"computing the {attribute!r} direction over the {split} split of {root}", file=sys.stderr)
    sums = {1: None, -1: None}
    counts = {1: 0, -1: 0}
    batch, signs = [], []

    def flush() -> None:
        zs = encode_images(loaded.model, torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2))
        for sign in (1, -1):
            mask = torch.tensor(signs) == sign
            part = [z[mask].double().sum(0) for z in zs]
            sums[sign] = part if sums[sign] is None else [s + p for s, p in zip(sums[sign], part, strict=True)]
            counts[sign] += int(mask.sum())
        batch.clear()
        signs.clear()

    for image, _, attrs in iter_samples(root, split):
        batch.append(image)
        signs.append(attrs[attribute])
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not counts[1] or not counts[-1]:
        raise LatentError(f"attribute {attribute!r} needs both positive and negative examples in the {split} split "
                          f"of {root}; it has {counts[1]} positive and {counts[-1]} negative")
    direction = [(p / counts[1] - n / counts[-1]).float() for p, n in zip(sums[1], sums[-1], strict=True)]
    if cache:
        _save_cache({"key": key, "direction": direction, "counts": counts}, path)
    return direction


def _save_cache(obj: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(obj, f))  # a concurrent reader sees the old file or the new one
    except OSError as e:  # a read-only checkpoint folder costs a recomputation next time, nothing more
        print(f"note: could not cache the attribute direction in {path.parent}: {e}", file=sys.stderr)


def save_latents(path: str | Path, zs: Latents, loaded: LoadedModel, names: Sequence[str]) -> Path:
    """`.npz` with z0, z1, ... (finest first) and the metadata `load_latents` checks against a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"z{i}": z.numpy() for i, z in enumerate(zs)}
    np.savez(path, **arrays, names=np.array(list(names)), checkpoint=np.array(str(loaded.path)),
             checkpoint_sha256=np.array(loaded.sha256), step=np.array(loaded.step),
             n_bits=np.array(loaded.model.cfg.n_bits),
             model_config=np.array(json.dumps(to_dict(loaded.config)["model"])))
    return path


def load_latents(path: str | Path, loaded: LoadedModel) -> tuple[Latents, list[str]]:
    """Latents and image names from `save_latents`; LatentError unless they fit `loaded`'s model."""
    path = Path(path)
    if not path.is_file():
        raise LatentError(f"latents file {path} does not exist; write one with `glow-dist encode`")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise LatentError(f"{path} is not a latents .npz file: {e}") from None
    levels = sorted((k for k in data if k[0] == "z" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if not levels or "n_bits" not in data:
        raise LatentError(f"{path} lacks z0, z1, ... or n_bits; write it with `glow-dist encode`")
    zs = [torch.from_numpy(data[k]).float() for k in levels]
    check_latent_shapes(loaded.model, [z.shape[1:] for z in zs], f"latents in {path}")
    if "model_config" in data:
        saved = from_dict({"model": json.loads(str(data["model_config"]))}, f"latents in {path}")
        changed = architecture_differences(saved, loaded.config, ("latents", "checkpoint"))
        if changed:
            raise LatentError(f"latents in {path} come from another model ({', '.join(changed)}); use the checkpoint "
                              "that made them")
    if int(data["n_bits"]) != loaded.model.cfg.n_bits:
        raise LatentError(f"latents in {path} were made with n_bits={int(data['n_bits'])}, this checkpoint's model "
                          f"uses {loaded.model.cfg.n_bits}; use the checkpoint that made them")
    if "checkpoint_sha256" in data and str(data["checkpoint_sha256"]) != loaded.sha256:
        # Same architecture, other weights (another step or run): allowed, but the round trip is no longer exact.
        print(f"note: {path} was encoded with {data['checkpoint']} (step {int(data['step'])}), not with "
              f"{loaded.path}; decoding with other weights does not give the encoded images back", file=sys.stderr)
    names = [str(n) for n in data["names"]] if "names" in data else [f"{i:04d}" for i in range(len(zs[0]))]
    return zs, names
