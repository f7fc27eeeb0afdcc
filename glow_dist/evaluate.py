"""Test-set bits/dim over the whole split with every rank's share summed, and a per-pixel baseline.

    bpd = evaluate_bpd(model, test_loader, n_bits, reduce_fn=dist.allreduce_sum)

Works single-process (reduce_fn=None) and distributed: each rank sums over its disjoint share, one all-reduce adds
the shares, so the result is the average over every test sample exactly once.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from glow_dist.model import bits_per_dim_from_log_prob, preprocess, quantize
from glow_dist.model.layers import Reducer


@torch.no_grad()
def evaluate_bpd(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_bits: int,
                 reduce_fn: Reducer | None = None, y_condition: bool = False, max_batches: int = 0,
                 seed: int = 0) -> float:
    """Mean bits/dim (uniform dequantization noise, as in training) over all ranks' test samples."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # [sum of per-sample bpd, sample count]
    generator = None
    for i, (images, labels) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if generator is None:  # fixed noise, so evaluating the same weights twice gives the same number
            generator = torch.Generator(device=images.device).manual_seed(seed)
        x = preprocess(images, n_bits, noise=True, generator=generator)
        log_prob = model.log_prob(x, labels) if y_condition else model.log_prob(x)
        bpd = bits_per_dim_from_log_prob(log_prob, x[0].numel(), n_bits)
        total += torch.stack([bpd.double().sum().cpu(), torch.tensor(float(len(bpd)), dtype=torch.float64)])
    model.train(was_training)
    if reduce_fn is not None:
        total = reduce_fn(total)
    if total[1] == 0:
        raise ValueError("the test split yielded no samples: check data.root and the test shards")
    return float(total[0] / total[1])


def pixel_histograms(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_bits: int) -> torch.Tensor:
    """Counts (C*H*W, n_bins) of each bin at each pixel position, over the given uint8 batches."""
    counts = None
    for images, _ in batches:
        bins = quantize(images.cpu(), n_bits).flatten(1)  # (B, D)
        if counts is None:
            counts = torch.zeros(bins.shape[1], 2 ** n_bits, dtype=torch.float64)
        counts.scatter_add_(1, bins.T.contiguous(), torch.ones(bins.T.shape, dtype=torch.float64))
    if counts is None:
        raise ValueError("no samples to build the per-pixel baseline from")
    return counts


def independent_pixel_bpd(train_counts: torch.Tensor, test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          n_bits: int, reduce_fn: Reducer | None = None) -> float:
    """Bits/dim of the baseline that models every pixel independently by its training histogram.

    Add-one-half smoothing (Krichevsky-Trofimov) keeps unseen values finite. A flow must beat this number.
    """
    probs = (train_counts + 0.5) / (train_counts.sum(dim=1, keepdim=True) + 0.5 * train_counts.shape[1])
    log2_probs = torch.log2(probs)
    total = torch.zeros(2, dtype=torch.float64)
    for images, _ in test_batches:
        bins = quantize(images.cpu(), n_bits).flatten(1)  # (B, D)
        bits = -log2_probs.gather(1, bins.T.contiguous())  # (D, B)
        total += torch.tensor([bits.sum().item(), float(bins.numel())], dtype=torch.float64)
    if reduce_fn is not None:
        total = reduce_fn(total)
    return float(total[0] / total[1])


def uniform_bound(n_bits: int) -> float:
    """Bits/dim of the uniform distribution over the bins: the score of a model that learned nothing."""
    return float(n_bits)
