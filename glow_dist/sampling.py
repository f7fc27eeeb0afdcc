"""Sample grids: one row per temperature, written as PNG. The trainer's MLflow grids and `glow-dist sample` share it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


@torch.no_grad()
def sample_images(model: Glow, n: int, temperature: float, labels: torch.Tensor | None = None,
                  seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """n uint8 images at `temperature`, from a fixed seed so grids of different steps are comparable.

    `batch_size` bounds how many are decoded at once (a 256x256 model cannot take 64 in one pass).
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if model.cfg.y_condition and labels is None:
            labels = torch.arange(n, device=device) % model.cfg.num_classes
        step = batch_size or n
        chunks = [model.sample(min(step, n - i), temperature, y=None if labels is None else labels[i:i + step])
                  for i in range(0, n, step)]
    return postprocess(torch.cat(chunks), model.cfg.n_bits)


def temperature_grid(model: Glow, temperatures: list[float], per_row: int, seed: int = 0,
                     labels: torch.Tensor | None = None, ncols: int | None = None,
                     batch_size: int | None = None) -> np.ndarray:
    """`per_row` samples for each temperature, one row each (`ncols` < per_row wraps a row onto several)."""
    rows = [sample_images(model, per_row, t, labels=labels, seed=seed, batch_size=batch_size)
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
