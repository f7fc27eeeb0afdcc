"""Test-set bits/dim of a checkpoint's EMA weights (or raw ones) over a whole test split (works under horovodrun too):

  glow-dist evaluate --checkpoint runs/digits --data data/digits --baseline
  horovodrun -np 2 -H localhost:2 --gloo glow-dist evaluate --checkpoint runs/digits/checkpoints/ckpt-00001000.pt

--checkpoint takes a checkpoint file or a run directory (its newest valid checkpoint). --baseline also prints the
uniform bound (n_bits) and a per-pixel independent histogram model fitted on the training split.
The output names the weights it scored: `weights: EMA (...)` with the decay and warm-up state, or `weights: raw`.
The EMA's decay is warmed up (glow_dist/training/ema.py), so from a few hundred steps on it scores as well as the raw
weights or better (BENCHMARKS.md, "Model quality"); a checkpoint written before the warm-up existed says so.

--checkpoint (alias --model) also takes a logged MLflow model: models:/NAME/VERSION or runs:/RUN_ID/model.

The result goes to the MLflow run that trained the checkpoint (unless --no-tracking), at the checkpoint's step:
`bits_per_dim/evaluate` with the weights it scored in the tag `evaluate.weights`, and with --baseline
`bits_per_dim/baseline_uniform` and `bits_per_dim/baseline_per_pixel`; the run's description gets a results line.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_checkpoint_argument, tracking_of
from glow_dist.config import choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--data", help="shard folder or URL (default: the checkpoint config's data.root)")
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--backend", choices=choices("data.backend"), help="data backend override")
    parser.add_argument("--baseline", action="store_true", help="also print the uniform and per-pixel baselines")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--no-tracking", action="store_true", help="do not log the result to the checkpoint's run")


def describe_weights(state: dict, raw: bool) -> str:
    """What `glow-dist evaluate` scored, in words: raw, or EMA with its decay and warm-up state."""
    if raw:
        return "raw (the trained weights themselves, --raw-weights)"
    from glow_dist.checkpoint import EMA_UPDATES_KEY as UPDATES_KEY
    from glow_dist.training.ema import WARMUP_OFFSET, warmup_decay

    decay = state["config"]["optim"]["ema_decay"]
    if decay == 0:
        return "EMA, which is the raw weights here (optim.ema_decay=0)"
    if UPDATES_KEY not in state["ema"]:
        return (f"EMA (decay {decay:g}, written before the EMA warm-up existed: on a short run it still holds "
                "much of the initial weights; compare --raw-weights)")
    n = int(state["ema"][UPDATES_KEY])
    return (f"EMA (decay {decay:g} warmed up as min(decay, (1+n)/({WARMUP_OFFSET}+n)); {n} updates, "
            f"now {warmup_decay(decay, n):.4f})")


def run(args: argparse.Namespace) -> int:
    from glow_dist.data import make_loader
    from glow_dist.distributed import gateway as dist
    from glow_dist.inference.loading import model_from_state, open_source
    from glow_dist.training.evaluation import evaluate_bpd, independent_pixel_bpd, pixel_histograms, uniform_bound

    dist.init()
    device = dist.pin_device()
    path, state = open_source(args.checkpoint, tracking_of(args))
    model, cfg, path, step, _ = model_from_state(path, state, device, weights="model" if args.raw_weights else "ema")
    weights_description = describe_weights(state, raw=args.raw_weights)
    if args.data:
        cfg.data.root = args.data
    if args.backend:
        cfg.data.backend = args.backend
    common = dict(rank=dist.rank(), world_size=dist.size(), batch_size=args.batch_size, device=device,
                  seed=cfg.train.seed)
    test = make_loader(cfg.data, cfg.model, "test", **common)
    bpd = evaluate_bpd(model, test.epoch(0), cfg.model.n_bits, reduce_fn=dist.allreduce_sum,
                       y_condition=cfg.model.y_condition, seed=cfg.train.seed)
    metrics = {"bits_per_dim/evaluate": bpd}
    lines = [f"checkpoint {path} (step {step})",
             f"test bits/dim: {bpd:.4f}  ({'raw' if args.raw_weights else 'EMA'} weights, data {cfg.data.root})",
             f"weights: {weights_description}"]
    if args.baseline:
        train = make_loader(cfg.data, cfg.model, "train", **common)
        counts = dist.allreduce_sum(pixel_histograms(train.epoch(0), cfg.model.n_bits))
        baseline = independent_pixel_bpd(counts, test.epoch(0), cfg.model.n_bits, reduce_fn=dist.allreduce_sum)
        lines += [f"uniform {cfg.model.n_bits}-bit bound: {uniform_bound(cfg.model.n_bits):.4f} bits/dim",
                  f"per-pixel independent baseline: {baseline:.4f} bits/dim"]
        metrics.update({"bits_per_dim/baseline_uniform": uniform_bound(cfg.model.n_bits),
                        "bits_per_dim/baseline_per_pixel": baseline})
    if dist.is_main() and not args.no_tracking:
        from glow_dist.tracking.client import log_evaluation

        weights_tag = "raw" if args.raw_weights else "ema"
        summary = (f"- `glow-dist evaluate` ({weights_tag} weights, step {step:,}, {dist.size()} rank(s)): "
                   + ", ".join(f"`{k}` **{v:.4f}**" for k, v in metrics.items()))
        lines.append(log_evaluation(cfg, state.get("mlflow_run_id"), step, metrics,
                                    {"evaluate.weights": weights_tag, "evaluate.checkpoint": str(path),
                                     "evaluate.data": cfg.data.root}, summary))
    if dist.is_main():
        print("\n".join(lines), flush=True)
    return 0
