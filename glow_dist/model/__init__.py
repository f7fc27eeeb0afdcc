"""The Glow model. Imports nothing from the distributed, tracking, data or checkpoint code."""
from glow_dist.model.glow import Glow, GlowOutput, build_model
from glow_dist.model.likelihood import (
    bits_per_dim,
    bits_per_dim_from_log_prob,
    discrete_log_prob,
    postprocess,
    preprocess,
    quantize,
)

__all__ = [
    "Glow",
    "GlowOutput",
    "build_model",
    "bits_per_dim",
    "bits_per_dim_from_log_prob",
    "discrete_log_prob",
    "postprocess",
    "preprocess",
    "quantize",
]
