"""Peak training memory against depth K for plain backprop, per-step checkpointing and invertible recomputation.

    .venv/bin/python bench/bench_memory.py                       # 64x64x3, L=4, width 256, batch 8, K = 8 16 32
    .venv/bin/python bench/bench_memory.py --ks 4 8 --batch 4    # quicker

Each (memory mode, K) runs in a fresh subprocess, which builds the model (affine coupling, LU 1x1 convs, weights
perturbed from their identity init, ActNorm initialized from the batch) and runs forward + backward of bits/dim twice:

1. Saved-for-backward bytes (deterministic): every tensor autograd saves goes through
   `torch.autograd.graph.saved_tensors_hooks`; the peak of the live ones (one count per storage, weights excluded)
   over forward *and* backward is reported, so invertible mode's one-step recomputation during backward counts.
   Non-reentrant checkpointing saves through its own inner hooks, which hide it from ours; for that mode the
   column shows `glow_dist.preflight.plan`'s figure instead (every step's input plus what is saved outside the
   steps, plus the largest single step's saved tensors, measured on the meta device).
2. Peak memory (what the allocator really held): on CPU, the process's peak RSS (VmHWM, reset through
   /proc/self/clear_refs) minus its RSS just before the pass. Gradients already exist from pass 1, so the delta is
   activations plus temporaries. glibc's dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors
   go back to the OS at once and RSS follows live memory. On CUDA: torch.cuda.max_memory_allocated minus the
   allocated bytes before the pass.

For invertible mode the child then runs plain backprop on the same weights and batch and reports the relative error
of the gradients: ||g_invertible - g_plain|| / ||g_plain|| over all parameters, and the worst single tensor, in
float64 (exactness). In float32 it compares them on two models: the perturbed one above (a stress test: random
weights make a deep, badly conditioned flow whose float32 gradients are noisy whatever the method), and a model in a
training state (the trainer's init, ActNorm from the batch, then `--train-steps` Adamax steps at lr 1e-4 of plain
backprop; 1e-3 without the trainer's warmup overflows at K=32), reported with that model's float32 noise floor (plain
float32 against float64).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time

import torch

from glow_dist.config import ModelConfig, RuntimeConfig
from glow_dist.model import Glow, bits_per_dim_from_log_prob, measure_activations

MODES = ("plain", "checkpoint", "invertible")
MIB = 2**20


def bench_config(steps: int) -> ModelConfig:
    return ModelConfig(image_size=64, channels=3, levels=4, steps=steps, width=256, coupling="affine", invconv="lu",
                       n_bits=8)


class SavedTensorPeak:
    """Peak bytes of tensors alive because autograd saved them (one count per storage; weights excluded)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage()._cdata
        return t if key in self.exclude else _Held(self, t, key)

    @staticmethod
    def unpack(held):
        return held if isinstance(held, torch.Tensor) else held.tensor


class _Held:
    """A saved tensor; its lifetime is the lifetime of the autograd node that saved it."""

    def __init__(self, tracker: SavedTensorPeak, tensor: torch.Tensor, key: int):
        self.tracker, self.tensor, self.key = tracker, tensor, key
        tracker.refs[key] = tracker.refs.get(key, 0) + 1
        if tracker.refs[key] == 1:
            tracker.live += tensor.untyped_storage().nbytes()
            tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self):
        self.tracker.refs[self.key] -= 1
        if self.tracker.refs[self.key] == 0:
            self.tracker.live -= self.tensor.untyped_storage().nbytes()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _backward(model: Glow, x: torch.Tensor) -> None:
    loss = bits_per_dim_from_log_prob(model.log_prob(x), model.num_dims, model.cfg.n_bits).mean()
    loss.backward()


def _trained_model(cfg: ModelConfig, x: torch.Tensor, device: torch.device, steps: int) -> Glow:
    """The trainer's starting point (identity-like init, ActNorm from the batch) after `steps` Adamax steps."""
    torch.manual_seed(0)
    model = Glow(cfg).to(device)  # plain memory
    model.initialize(x)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        _backward(model, x)
        optimizer.step()
    optimizer.zero_grad()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"the model diverged in {steps} training steps")
    return model


def _perturbed_model(cfg: ModelConfig, memory: str, x: torch.Tensor, device: torch.device) -> Glow:
    torch.manual_seed(0)
    model = Glow(cfg, RuntimeConfig(memory=memory)).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the identity init, so the couplings (and their inverses) do real work
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    model.initialize(x)
    return model


def _copy(model: Glow, steps: int, memory: str, dtype: torch.dtype) -> Glow:
    other = Glow(bench_config(steps), RuntimeConfig(memory=memory)).to(next(model.parameters()).device, dtype)
    other.load_state_dict(model.state_dict())
    return other


def _grads(model: Glow, x: torch.Tensor) -> list[torch.Tensor]:
    _backward(model, x)
    return [p.grad for p in model.parameters()]


def _rel_err(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    diff = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(grads, reference, strict=True)))
    return float(diff / torch.sqrt(sum((b.double() ** 2).sum() for b in reference)))


def child(memory: str, steps: int, batch: int, train_steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench_config(steps)
    x = (torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(2)) - 0.5).to(device)
    model = _perturbed_model(cfg, memory, x, device)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    tracker = SavedTensorPeak(weights)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        _backward(model, x)  # also the warm-up: gradients now exist, oneDNN primitives are built
    saved = tracker.peak
    saved_source = "hooks"
    if memory == "checkpoint":
        saved, saved_source = measure_activations(cfg, batch)["checkpoint"], "plan"
    for p in model.parameters():
        p.grad.zero_()
    gc.collect()

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _backward(model, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
        _backward(model, x)
        peak = _status_kib("VmHWM") * 1024 - before
    result = {"memory": memory, "steps": steps, "peak": peak, "saved": saved, "saved_source": saved_source,
              "seconds": time.perf_counter() - start}

    if memory == "invertible":
        # Exactness: in float64 the invertible gradients must equal plain backprop's. Accuracy in float32: both
        # methods against the float64 gradient (the truth), since two float32 computations of an ill-conditioned
        # deep flow differ from each other by their rounding, whatever the method.
        truth = _grads(_copy(model, steps, "plain", torch.float64), x.double())
        inv64 = _grads(_copy(model, steps, "invertible", torch.float64), x.double())
        plain32 = _grads(_copy(model, steps, "plain", torch.float32), x)
        inv32 = [p.grad for p in model.parameters()]
        result["grad_rel_err"] = _rel_err(inv64, truth)
        result["grad_rel_err_worst"] = max(_rel_err([a], [b]) for a, b in zip(inv64, truth, strict=True))
        result["fp32_plain_vs_exact"] = _rel_err(plain32, truth)
        result["fp32_invertible_vs_exact"] = _rel_err(inv32, truth)
        # A model in a training state: float32 invertible against float32 plain directly.
        trained = _trained_model(cfg, x, device, train_steps)
        plain32 = _grads(trained, x)
        result["trained_fp32_vs_plain"] = _rel_err(_grads(_copy(trained, steps, "invertible", torch.float32), x),
                                                   plain32)
        result["trained_fp32_plain_vs_exact"] = _rel_err(
            plain32, _grads(_copy(trained, steps, "plain", torch.float64), x.double()))
        result["train_steps"] = train_steps
    return result


def run_child(memory: str, steps: int, batch: int, train_steps: int) -> dict:
    # Pinned mmap threshold: large tensors are mmapped and unmapped on free, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--child", memory, str(steps), "--batch", str(batch),
           "--train-steps", str(train_steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--train-steps", type=int, default=10,
                        help="Adamax steps before the float32 gradient comparison on a model in a training state")
    parser.add_argument("--child", nargs=2, metavar=("MEMORY", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.train_steps)))
        return

    device = "cuda (max_memory_allocated)" if torch.cuda.is_available() else "cpu (peak RSS delta)"
    print(f"64x64x3, L=4, width 256, affine, LU, batch {args.batch}, fp32; device {device}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for memory in args.modes:
        for k in args.ks:
            results[memory, k] = r = run_child(memory, k, args.batch, args.train_steps)
            extra = (f", fp64 grad rel err vs plain {r['grad_rel_err']:.1e}; fp32 vs exact: plain "
                     f"{r['fp32_plain_vs_exact']:.1e}, invertible {r['fp32_invertible_vs_exact']:.1e}; "
                     f"after {r['train_steps']} training steps: fp32 vs plain {r['trained_fp32_vs_plain']:.1e}, "
                     f"plain fp32 vs exact {r['trained_fp32_plain_vs_exact']:.1e}"
                     if "grad_rel_err" in r else "")
            print(f"  {memory} K={k}: peak {r['peak'] / MIB:.0f} MiB, saved {r['saved'] / MIB:.0f} MiB, "
                  f"step {r['seconds']:.1f} s{extra}", flush=True)

    first, last = args.ks[0], args.ks[-1]
    ks = " | ".join(f"K={k}" for k in args.ks)
    print(f"\nPeak memory of forward + backward (MiB), and saved-for-backward peak (MiB) in parentheses; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(f"| memory | {ks} | growth K={first}->{last} (peak / saved) | step at K={last} (s) | "
          f"fp64 grad rel err vs plain (all / worst tensor) | fp32 grad rel err vs exact (plain / invertible) | "
          f"trained {args.train_steps} steps: fp32 grad rel err vs plain (floor: plain fp32 vs exact) |")
    print("|---|" + "---|" * len(args.ks) + "---|---|---|---|---|")
    for memory in args.modes:
        row = [results[memory, k] for k in args.ks]
        cells = " | ".join(f"{r['peak'] / MIB:.0f} ({r['saved'] / MIB:.0f}{'*' if r['saved_source'] == 'plan' else ''})"
                           for r in row)
        growth = (f"{row[-1]['peak'] / row[0]['peak'] - 1:+.0%} / {row[-1]['saved'] / row[0]['saved'] - 1:+.0%}")
        last = row[-1]
        err = f"{last['grad_rel_err']:.1e} / {last['grad_rel_err_worst']:.1e}" if "grad_rel_err" in last else "-"
        fp32 = (f"{last['fp32_plain_vs_exact']:.1e} / {last['fp32_invertible_vs_exact']:.1e}"
                if "grad_rel_err" in last else "-")
        trained = (f"{last['trained_fp32_vs_plain']:.1e} ({last['trained_fp32_plain_vs_exact']:.1e})"
                   if "grad_rel_err" in last else "-")
        print(f"| {memory} | {cells} | {growth} | {last['seconds']:.1f} | {err} | {fp32} | {trained} |")
    print("\n* checkpoint's saved bytes are glow_dist.preflight.plan's figure (its inner hooks hide it from ours)")


if __name__ == "__main__":
    main()
