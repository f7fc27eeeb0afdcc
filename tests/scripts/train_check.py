"""Launched by tests/test_train.py under horovodrun (or alone): train a config and dump what the test compares.

    python tests/scripts/train_check.py OUTDIR --config configs/debug.yaml section.key=value ...

Writes OUTDIR/rank{R}.pt with this rank's init batch, its weights right after init (before any step), its final
weights, the test bits/dim before and after training, and the final position.
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
    init_x, _ = trainer.init_batch()
    seen: dict = {}
    init_actnorm = trainer.init_actnorm

    def init_and_record() -> None:  # fit() initializes ActNorm on a fresh start: record the weights right after
        init_actnorm()
        seen["after_init"] = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
        seen["before"] = trainer.evaluator.evaluate(trainer.test_data.epoch(0))  # collective, like init

    trainer.init_actnorm = init_and_record
    final = trainer.fit()
    after_init, before = seen["after_init"], seen["before"]
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"init_x": init_x.cpu(), "after_init": after_init, "final": trainer.state.model.state_dict(),
                "ema": trainer.state.ema.state_dict(), "test_bpd_before": before,
                "test_bpd_after": final["bits_per_dim/test_ema"], "final_metrics": final,
                "position": vars(trainer.state.position), "world": trainer.world, "run_id": trainer.report.run_id},
               out / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()
