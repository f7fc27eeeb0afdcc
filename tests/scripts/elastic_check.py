"""Launched by tests/test_elastic.py under an elastic horovodrun: train, then dump this rank's final state.

    python tests/scripts/elastic_check.py OUTDIR --config configs/debug.yaml dist.elastic=true section.key=value ...

Unlike train_check.py it makes no collective call outside `fit()`: a worker that joins a running elastic job must
make its first collective inside Horovod's elastic state sync. Writes OUTDIR/rank{R}.pt (R the rank at the end)
with the final weights, the EMA weights, the final position and the world size.
"""
import argparse
from pathlib import Path

import torch

from glow_dist.config import load_config
from glow_dist.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()  # the rest are section.key=value overrides
    trainer = Trainer(load_config(args.config, overrides))
    trainer.fit()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"final": trainer.state.model.state_dict(), "ema": trainer.state.ema.state_dict(),
                "position": vars(trainer.state.position), "world": trainer.world}, out / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()
