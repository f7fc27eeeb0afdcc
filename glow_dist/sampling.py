"""Sample grids: one row per temperature, written as PNG. The trainer's MLflow grids and `glow-dist sample` share it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glow_dist.decoder import Decoder, as_decoder
from glow_dist.model import Glow, postprocess


def image_grid(images: torch.Tensor, ncols: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows*H, ncols*W, C) uint8 array with `pad` black pixels between tiles."""
    n, c, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid


def sample_images(model: Glow | Decoder, n: int, temperature: float, labels: torch.Tensor | None = None,
                  seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """n uint8 images at `temperature`, from a fixed seed so grids of different steps are comparable.

    `model` is a Glow (decoded eagerly) or a `glow_dist.decoder.Decoder` of one (compiled or CUDA-graphed; keep one
    for repeated calls: it compiles or captures once). `batch_size` bounds how many are decoded at once (a 256x256
    model cannot take 64 in one pass); the draws, and so the images, do not depend on it.
    """
    decoder = as_decoder(model)
    return postprocess(decoder.sample(n, temperature, labels=labels, seed=seed, batch_size=batch_size),
                       decoder.model.cfg.n_bits)


def temperature_grid(model: Glow | Decoder, temperatures: list[float], per_row: int, seed: int = 0,
                     labels: torch.Tensor | None = None, ncols: int | None = None,
                     batch_size: int | None = None) -> np.ndarray:
    """`per_row` samples for each temperature, one row each (`ncols` < per_row wraps a row onto several)."""
    decoder = as_decoder(model)
    rows = [sample_images(decoder, per_row, t, labels=labels, seed=seed, batch_size=batch_size)
            for t in temperatures]
    return image_grid(torch.cat(rows), ncols=ncols or per_row)


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, C) uint8 array; `scale` enlarges tiny images (8x8 digits) with nearest neighbour."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
