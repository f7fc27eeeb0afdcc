"""Test-set bits/dim over the whole split with every rank's share summed, a per-pixel baseline, and the trainer's
evaluation policy (both weights scored; sample grids from the better ones).

    bpd = evaluate_bpd(model, test_loader, n_bits, reduce_fn=dist.allreduce_sum)
    evaluator = Evaluator(cfg, model, ema); metrics = evaluator.both(test_loader); model, why = evaluator.for_samples()

Works single-process (reduce_fn=None) and distributed: each rank sums over its disjoint share, one all-reduce adds
the shares, so the result is the average over every test sample exactly once.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from glow_dist.config import Config
from glow_dist.distributed import gateway as dist
from glow_dist.model import Glow, bits_per_dim_from_log_prob, preprocess, quantize
from glow_dist.model.layers import Reducer
from glow_dist.training.ema import EMA


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


class Evaluator:
    """Scores the EMA and the raw weights on the test split (collective: every rank calls it) and remembers the
    last scores, which decide the weights of the sample grids (`tracking.sample_weights`)."""

    def __init__(self, cfg: Config, model: Glow, ema: EMA):
        self.cfg, self.model, self.ema = cfg, model, ema
        self.last: dict[str, float] | None = None

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], weights: str = "ema") -> float:
        """Test bits/dim of the EMA (`weights="ema"`) or raw (`"raw"`) weights over every rank's share."""
        model = {"ema": self.ema.model, "raw": self.model}[weights]
        return evaluate_bpd(model, batches, self.cfg.model.n_bits, reduce_fn=dist.allreduce_sum,
                            y_condition=self.cfg.model.y_condition, max_batches=self.cfg.train.max_eval_batches,
                            seed=self.cfg.train.seed)

    def both(self, test: object) -> dict[str, float]:
        """`bits_per_dim/test_ema` and `bits_per_dim/test_raw` on a loader's epoch 0. While the EMA copy is the raw
        weights (no update since its reset, or decay 0), one pass scores both."""
        ema = self.evaluate(test.epoch(0), "ema")
        raw = ema if self.ema.updates == 0 or self.ema.decay == 0 else self.evaluate(test.epoch(0), "raw")
        self.last = {"ema": ema, "raw": raw}
        return {"bits_per_dim/test_ema": ema, "bits_per_dim/test_raw": raw}

    def sample_weights(self) -> str:
        """`ema` or `raw`: tracking.sample_weights, or for `best` whichever scored lower at the last evaluation
        (the EMA before any evaluation of this process, e.g. right after a resume)."""
        choice = self.cfg.tracking.sample_weights
        if choice != "best":
            return choice
        return "raw" if self.last and self.last["raw"] < self.last["ema"] else "ema"

    def for_samples(self, step: int) -> tuple[Glow, str]:
        """The model to draw sample grids from, and a line saying which weights and why."""
        weights = self.sample_weights()
        why = f"tracking.sample_weights={self.cfg.tracking.sample_weights}"
        if self.last:
            why += f"; test bits/dim EMA {self.last['ema']:.4f}, raw {self.last['raw']:.4f}"
        note = f"samples at step {step} from the {'EMA' if weights == 'ema' else 'raw'} weights ({why})"
        return (self.ema.model if weights == "ema" else self.model), note
