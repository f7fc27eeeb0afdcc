"""The Glow model: invertible layers, the multi-scale flow, and the likelihood in bits per dimension.

Built from `model` (the architecture, what the weights are) and `runtime` (memory mode, layout, precision, compile:
how it runs, never what it computes). Imports nothing from the distributed, tracking, data or checkpoint code
(an import-linter contract in `make lint`); ActNorm's data-dependent init takes a `reduce_fn` so that a distributed
caller can sum statistics over ranks without this package knowing about ranks.
"""
from glow_dist.model.glow import Glow, GlowOutput, build_model, meta_model, parameter_count
from glow_dist.model.likelihood import (
    bin_values,
    bits_per_dim,
    bits_per_dim_from_log_prob,
    postprocess,
    preprocess,
    quantize,
)
from glow_dist.model.memory import measure_activations, resolve_memory, resolved_runtime

__all__ = [
    "Glow",
    "GlowOutput",
    "bin_values",
    "bits_per_dim",
    "bits_per_dim_from_log_prob",
    "build_model",
    "measure_activations",
    "meta_model",
    "parameter_count",
    "postprocess",
    "preprocess",
    "quantize",
    "resolve_memory",
    "resolved_runtime",
]
