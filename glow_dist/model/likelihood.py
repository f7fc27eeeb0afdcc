"""From uint8 images to the model's continuous inputs, and from log densities to bits per dimension.

With n_bits kept, n_bins = 2**n_bits and x_q = floor(x / 2**(8 - n_bits)) is computed on the integer image
(never from a /255 float, which is off by one bin). The model sees x = x_q / n_bins - 0.5 + u with
u ~ U(0, 1/n_bins), and the discrete log-likelihood is log p(x) - D * log(n_bins).
"""
from __future__ import annotations

import math

import torch


def bin_width(n_bits: int) -> int:
    """How many 8-bit values one bin spans: 2**(8 - n_bits)."""
    return 2 ** (8 - n_bits)


def quantize(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images -> integer bin indices in [0, 2**n_bits)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}; quantize from the integer image, not floats")
    return torch.div(images.long(), bin_width(n_bits), rounding_mode="floor")


def bin_values(bins: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Bin indices -> uint8 images, each bin shown at its 8-bit value (bin * 2**(8 - n_bits))."""
    return (bins * bin_width(n_bits)).to(torch.uint8)


def preprocess(images: torch.Tensor, n_bits: int, noise: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-0.5, 0.5).

    noise=True: uniform dequantization (training and test bits/dim). noise=False: the centre of each bin,
    which makes encode -> decode -> `postprocess` reproduce the uint8 image exactly.
    """
    n_bins = 2 ** n_bits
    x = quantize(images, n_bits).float()
    if noise:
        u = torch.rand(x.shape, generator=generator, device=x.device) if generator else torch.rand_like(x)
    else:
        u = torch.full_like(x, 0.5)
    return (x + u) / n_bins - 0.5


def postprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Continuous [-0.5, 0.5] -> uint8 images, each bin shown at its 8-bit value (bin * 2**(8 - n_bits))."""
    n_bins = 2 ** n_bits
    return bin_values(torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1), n_bits)


def bits_per_dim_from_log_prob(log_prob: torch.Tensor, num_dims: int, n_bits: int) -> torch.Tensor:
    """bpd = -(log p(x) - D log n_bins) / (D ln 2) = n_bits - log p(x) / (D ln 2), per sample."""
    return n_bits - log_prob / (num_dims * math.log(2.0))


def bits_per_dim(model: torch.nn.Module, images: torch.Tensor, y: torch.Tensor | None = None,
                 n_bits: int | None = None, noise: bool = True) -> torch.Tensor:
    """Bits per dimension of uint8 images under `model` (anything with `log_prob(x, y)`), shape (B,)."""
    n_bits = n_bits if n_bits is not None else model.cfg.n_bits
    x = preprocess(images, n_bits, noise=noise)
    log_prob = model.log_prob(x, y) if y is not None else model.log_prob(x)
    return bits_per_dim_from_log_prob(log_prob, x[0].numel(), n_bits)
