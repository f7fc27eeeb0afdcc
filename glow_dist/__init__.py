"""glow-dist: distributed training of Glow (Kingma & Dhariwal, 2018).

The model lives in `glow_dist.model` and knows nothing of distribution, data or tracking;
`glow_dist.config` holds the config tree; the CLI is `glow-dist` (`python -m glow_dist`).
"""
__version__ = "0.1.0"
