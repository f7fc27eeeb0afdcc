"""Model quality on natural images: test bits/dim of the EMA and raw weights at a few step budgets, through the CLI.

    nice -n 10 .venv/bin/python bench/bench_quality.py                       # default recipe, the port's, variants
    nice -n 10 .venv/bin/python bench/bench_quality.py --recipes default port --budgets 200 400 800
    nice -n 10 .venv/bin/python bench/bench_quality.py --recipes default port no-warmup warmup-400 no-clip \
        --seeds 0 1 2 --couplings affine --work DIR --json affine.json     # the recipe's ablations over seeds

Data: the RGB photographs that ship inside scikit-image (`skimage.data`: astronaut, chelsea, coffee, rocket, ...),
cut into 32x32 patches at three scales (the photo at 1/1, 1/2 and 1/4 size). The split is fixed and spatial: in
every photo the rightmost 20% of the columns is the test region, the rest the training region, and a patch belongs to
a split only when it lies entirely in its region at every scale, so no test pixel is ever seen in training. Training
patches overlap (stride 16), test ones do not (stride 32). The PNGs are written to a temporary folder and turned into
shards by the project's own prepare path (`glow_dist.data.prepare.prepare` on `folder_source`s, as
`glow-dist prepare folder` does; the two folders are the two splits instead of a random fraction).

Each recipe is trained through the real CLI (`python -m glow_dist train ...`, one process) for the largest budget,
with a test evaluation and a checkpoint at every budget (the learning rate has no decay, so the state at step 200 of
an 800-step run is that of a 200-step run). For each budget the table shows `bits_per_dim/test_ema`,
`bits_per_dim/test_raw` (from the run's metrics.jsonl), and, for the default recipe, what `glow-dist evaluate` prints
for that checkpoint with its default weights. `port` is the recipe of a popular PyTorch port (Adam 1e-4, no EMA, no
warm-up, no gradient clipping) on the same architecture, data, batch and steps.

`--seeds` trains every recipe once per `train.seed` (initial weights, data order, dequantization noise); the tables
give the mean ± sample sd over seeds, and differences between recipes are paired by seed (same initial weights and
data order). `--couplings affine additive` repeats everything with the other coupling (the paper's CelebA-HQ and
LSUN-128 runs use additive, its CIFAR/ImageNet/LSUN-64 runs affine). Every step's gradient norm (before clipping) is
logged (`train.log_every=1`), so the clipping table counts the steps in which clipping acted.

`--ema-study` trains the default recipe once more in-process (the real Trainer) and scores, at every budget, other
averages of the same trajectory: the EMA without warm-up (the code before issue 17), a bias-corrected EMA, and the
warmed-up EMA at other decays. The training itself does not depend on the average, so one run answers all of them.

bits/dim are load-independent: the numbers are valid on a shared machine (the wall time is not, and is not shown).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
SCALES = (1, 2, 4)
TEST_COLUMNS = 0.2  # the rightmost fraction of every photo is the test region

# The architecture of every recipe (small enough for a 2-core CPU; 5-bit as in the paper's CelebA-HQ runs).
ARCH = ["model.image_size=32", "model.channels=3", "model.n_bits=5", "model.levels=3", "model.steps=4",
        "model.width=64", "model.invconv=lu", "model.learn_top=true",
        "train.batch_size=16", "train.init_batch_size=64"]

COUPLINGS = ("affine", "additive")  # affine: the paper's CIFAR/ImageNet/LSUN-64 runs; additive: its CelebA-HQ/LSUN-128

# name -> overrides on top of the defaults of glow_dist/config.py (the default recipe has none).
RECIPES: dict[str, list[str]] = {
    "default": [],
    "port": ["optim.name=adam", "optim.lr=1e-4", "optim.ema_decay=0", "optim.warmup_steps=0", "optim.grad_clip=0"],
    "adamax-lr3e-4": ["optim.lr=3e-4"],
    "adamax-lr3e-3": ["optim.lr=3e-3"],
    "adam-lr1e-3": ["optim.name=adam"],
    "no-warmup": ["optim.warmup_steps=0"],
    "warmup-400": ["optim.warmup_steps=400"],
    "no-clip": ["optim.grad_clip=0"],
}
DEFAULT_RECIPES = ["default", "port"]


def load_photos() -> dict[str, np.ndarray]:
    """The RGB photographs of skimage.data that load without a download (uint8 H x W x 3)."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("bench_quality needs scikit-image: .venv/bin/pip install -e '.[test]'")
    photos = {}
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception as e:  # a photo that needs a download (no network): go on without it
            print(f"note: skimage.data.{name} unavailable ({type(e).__name__}); skipped", file=sys.stderr)
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    if not photos:
        sys.exit("no skimage.data photograph could be loaded")
    return photos


def patches(photos: dict[str, np.ndarray], size: int = 32) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{"train": [(name, patch)], "test": [...]}: the fixed spatial split described in the module docstring."""
    from PIL import Image

    out: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    for name, photo in photos.items():
        height, width = photo.shape[:2]
        border = int(round(width * (1 - TEST_COLUMNS)))  # in original pixels: train left of it, test right of it
        for scale in SCALES:
            small = np.asarray(Image.fromarray(photo).resize((width // scale, height // scale), Image.BOX))
            h, w = small.shape[:2]
            for split, stride in (("train", size // 2), ("test", size)):
                for y in range(0, h - size + 1, stride):
                    for x in range(0, w - size + 1, stride):
                        left, right = x * scale, (x + size) * scale  # the patch's columns in the original photo
                        inside = right <= border if split == "train" else left >= border
                        if inside:
                            out[split].append((f"{name}-s{scale}-y{y:04d}-x{x:04d}", small[y:y + size, x:x + size]))
    return out


def prepare_shards(out: Path, seed: int = 0) -> dict:
    """Write the patches as PNGs and prepare them into `out` with the project's prepare path; returns the manifest."""
    from PIL import Image

    from glow_dist.data.prepare import prepare
    from glow_dist.data.sources import Source, folder_source

    split_patches = patches(load_photos())
    with tempfile.TemporaryDirectory(prefix="bench-quality-png-") as tmp:
        folders = {}
        for split, items in split_patches.items():
            folder = Path(tmp) / split
            folder.mkdir()
            for name, patch in items:
                Image.fromarray(patch).save(folder / f"{name}.png")
            folders[split] = folder_source(folder, channels=3, classes=False, attributes=None, test_fraction=0.0,
                                           seed=seed).train
        source = Source("skimage-patches", 3, "bicubic", train=folders["train"], test=folders["test"])
        return prepare(source, out, size=32, channels=3, shard_size=1000, seed=seed, workers=1, overwrite=True)


def base_config(work: Path) -> Path:
    """A config file that leaves every recipe setting at the defaults of glow_dist/config.py."""
    path = work / "quality.yaml"
    if not path.exists():
        path.write_text("# bench/bench_quality.py: everything else is given as overrides\ntracking:\n"
                        "  experiment: bench-quality\n")
    return path


def common_overrides(data: Path, run_dir: Path, budgets: list[int], threads: int, log_every: int = 50) -> list[str]:
    every = math.gcd(*budgets)
    return [*ARCH, f"data.root={data}", "data.backend=webdataset", f"train.run_dir={run_dir}",
            f"train.steps={max(budgets)}", f"train.eval_every={every}", f"train.checkpoint_every={every}",
            "train.keep_checkpoints=0", f"train.sample_every={10 ** 9}", f"train.log_every={log_every}",
            "train.progress=false", f"train.threads={threads}", "train.resume=never",
            f"tracking.local_dir={run_dir / 'mlflow'}", "tracking.sample_count=4", "tracking.sample_temperatures=[0.7]"]


def run_name(recipe: str, coupling: str, seed: int) -> str:
    return f"{coupling}-{recipe}-seed{seed}"


def recipe_clip(name: str) -> float:
    """The gradient-clipping norm a recipe trains with (its override, else the default of glow_dist/config.py)."""
    from glow_dist.config import load_config

    return load_config(None, RECIPES[name]).optim.grad_clip


def train_recipe(name: str, data: Path, work: Path, budgets: list[int], threads: int, coupling: str = "affine",
                 seed: int = 0, log_every: int = 1) -> dict:
    """Train one recipe through the CLI (unless --work already holds its finished run) and read its test curves,
    and the gradient norm of every logged step (log_every=1: every step, before clipping)."""
    run_dir = work / run_name(name, coupling, seed)
    if not (run_dir / "checkpoints" / f"ckpt-{max(budgets):08d}.pt").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run: start it over
        cmd = [sys.executable, "-m", "glow_dist", "train", "--config", str(base_config(work)),
               *common_overrides(data, run_dir, budgets, threads, log_every), f"model.coupling={coupling}",
               f"train.seed={seed}", *RECIPES[name]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"{run_dir.name}: training failed:\n{out.stderr[-3000:]}")
    curves: dict[str, dict[int, float]] = {"ema": {}, "raw": {}}
    grad_norm: dict[int, float] = {}
    skipped = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for weights in curves:
            value = record["metrics"].get(f"bits_per_dim/test_{weights}")
            if value is not None:
                curves[weights][record["step"]] = value
        if "grad_norm" in record["metrics"]:
            grad_norm[record["step"]] = record["metrics"]["grad_norm"]
        skipped = max(skipped, record["metrics"].get("skipped_steps", 0.0))
    return {"run_dir": run_dir, "curves": curves, "grad_norm": grad_norm, "skipped": skipped}


def evaluate_cli(checkpoint: Path, *extra: str) -> tuple[float, str]:
    """`glow-dist evaluate` on a checkpoint: its test bits/dim and its whole output (kept next to the checkpoint, so
    a rerun with the same --work does not evaluate it again)."""
    saved = checkpoint.with_name(checkpoint.name + ".evaluate" + "".join(extra) + ".txt")
    if saved.is_file():
        text = saved.read_text()
    else:
        out = subprocess.run([sys.executable, "-m", "glow_dist", "evaluate", "--checkpoint", str(checkpoint), *extra],
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"evaluate {checkpoint} failed:\n{out.stderr[-3000:]}")
        text = out.stdout
        saved.write_text(text)
    return float(text.split("test bits/dim:")[1].split()[0]), text


def per_pixel_baseline(checkpoint: Path) -> float:
    _, text = evaluate_cli(checkpoint, "--baseline")
    return float(text.split("per-pixel independent baseline:")[1].split()[0])


# ---- --ema-study: other averages of one trajectory, scored by the real Trainer's evaluation -----------------------

class PlainEMA:
    """The average before issue 17: a fixed decay from the initial weights."""

    def __init__(self, model, decay: float):
        import copy

        self.decay, self.model = decay, copy.deepcopy(model).eval()

    def update(self, model) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()],
                                 1.0 - self.decay)


class WarmupEMA(PlainEMA):
    """min(decay, (1 + n) / (offset + n)): the trainer's schedule (offset 10) with another offset; a larger offset
    averages over a shorter recent window (about n / (offset - 1) steps), a smaller one over a longer one."""

    def __init__(self, model, decay: float, offset: float):
        super().__init__(model, decay)
        self.offset, self.n = offset, 0

    def update(self, model) -> None:
        import torch

        d = min(self.decay, (1.0 + self.n) / (self.offset + self.n))
        self.n += 1
        with torch.no_grad():
            torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)


class BiasCorrectedEMA(PlainEMA):
    """Adam-style: the average starts at zero and is divided by 1 - decay**n."""

    def __init__(self, model, decay: float):
        import torch

        super().__init__(model, decay)
        self.n = 0
        self.sums = [torch.zeros_like(p) for p in self.model.parameters()]

    def update(self, model) -> None:
        import torch

        self.n += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.sums, [p.detach() for p in model.parameters()], 1.0 - self.decay)
            correction = 1.0 - self.decay ** self.n
            for p, s in zip(self.model.parameters(), self.sums, strict=True):
                p.copy_(s / correction)


def ema_study_worker(outfile: Path, overrides: list[str], budgets: list[int]) -> None:
    """In a subprocess: train the default recipe with the real Trainer and score extra averages at every budget."""
    from glow_dist.config import load_config
    from glow_dist.training.ema import WARMUP_OFFSET
    from glow_dist.training.evaluation import evaluate_bpd
    from glow_dist.training.trainer import Trainer

    trainer = Trainer(load_config(base_config(outfile.parent), overrides))
    decay = trainer.cfg.optim.ema_decay
    model, ema, evaluator = trainer.state.model, trainer.state.ema, trainer.evaluator
    extra = {f"no warm-up {decay:g} (before)": PlainEMA(model, decay),
             f"bias-corrected {decay:g}": BiasCorrectedEMA(model, decay)}
    for offset in (k for k in (4, 10, 20, 40) if k != WARMUP_OFFSET):
        extra[f"warm-up {decay:g}, (1+n)/({offset}+n)"] = WarmupEMA(model, decay, offset)
    for avg in extra.values():  # start where the trainer's own EMA starts: at the ActNorm-initialized weights
        avg.model.load_state_dict(model.state_dict())
    update, evaluate_both = ema.update, evaluator.both
    scores: dict[str, dict[int, float]] = {name: {} for name in extra}
    trainers = f"warm-up {decay:g}, (1+n)/({WARMUP_OFFSET}+n) (the trainer's)"
    scores[trainers], scores["raw"] = {}, {}

    def update_all(model) -> None:
        update(model)
        for avg in extra.values():
            avg.update(model)

    def evaluate_all(test) -> dict[str, float]:
        result = evaluate_both(test)
        step = trainer.state.position.step
        if step in budgets:
            scores[trainers][step] = result["bits_per_dim/test_ema"]
            scores["raw"][step] = result["bits_per_dim/test_raw"]
            for name, avg in extra.items():
                scores[name][step] = evaluate_bpd(avg.model, trainer.test_data.epoch(0), trainer.cfg.model.n_bits,
                                                  seed=trainer.cfg.train.seed)
        return result

    ema.update, evaluator.both = update_all, evaluate_all
    trainer.fit()
    outfile.write_text(json.dumps(scores))


def ema_study(data: Path, work: Path, budgets: list[int], threads: int) -> dict[str, dict[int, float]]:
    run_dir = work / "ema-study"
    outfile = work / "ema-study.json"
    if outfile.is_file():  # kept in --work from an earlier run
        return {name: {int(k): v for k, v in curve.items()} for name, curve in json.loads(outfile.read_text()).items()}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ema-worker", str(outfile), "--budgets",
           *map(str, budgets), "--", *common_overrides(data, run_dir, budgets, threads), "model.coupling=affine"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"ema study failed:\n{out.stderr[-3000:]}")
    return {name: {int(k): v for k, v in curve.items()} for name, curve in json.loads(outfile.read_text()).items()}


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(finite), "max": max(finite), "n": len(finite)}


def _cell(values: list[float], signed: bool = False, spread: bool = False) -> str:
    """mean, then ± the sample standard deviation over seeds, then [min, max] when `spread`."""
    st = _stats(values)
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f.format(st["mean"])
    if st["n"] > 1:
        text += f" ± {st['sd']:.3f}"
        if spread:
            text += f" [{f.format(st['min'])}, {f.format(st['max'])}]"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES) + ["all"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[200, 400, 800])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train.seed of each run (initial weights, data order, dequantization noise); every "
                        "recipe is trained once per seed, and the tables give the mean ± sd over seeds")
    parser.add_argument("--couplings", nargs="+", default=["affine"], choices=COUPLINGS,
                        help="model.coupling of the architecture; each is a separate set of runs and tables")
    parser.add_argument("--log-every", type=int, default=1,
                        help="train.log_every: 1 logs every step's gradient norm, to count the clipped steps")
    parser.add_argument("--ema-study", action="store_true", help="also score other EMA variants (one more run)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--work", help="keep shards and runs here (default: a temporary folder); finished runs "
                        "found there are reused")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--ema-worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    budgets = sorted(set(args.budgets))
    if args.ema_worker:
        ema_study_worker(Path(args.ema_worker), [r for r in rest if r != "--"], budgets)
        return
    recipes = list(RECIPES) if "all" in args.recipes else list(args.recipes)
    if "default" not in recipes:
        recipes.insert(0, "default")
    seeds = list(dict.fromkeys(args.seeds))
    couplings = list(dict.fromkeys(args.couplings))

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "shards"
        manifest = (json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file()
                    else prepare_shards(data))  # --work: the shards of an earlier run are reused
        n_train, n_test = (manifest["splits"][s]["num_samples"] for s in ("train", "test"))
        print(f"data: {n_train} train / {n_test} test 32x32 RGB patches from skimage.data photographs "
              f"(scales 1/{', 1/'.join(map(str, SCALES))}), 5-bit", flush=True)
        print(f"architecture: {' '.join(a for a in ARCH)}, model.coupling={'|'.join(couplings)}", flush=True)
        print(f"seeds: {' '.join(map(str, seeds))}; cells are the mean ± sample sd over seeds"
              + (", [min, max] for differences" if len(seeds) > 1 else ""), flush=True)
        keys = [(c, s, r) for c in couplings for s in seeds for r in recipes]  # one seed of everything first
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {k: pool.submit(train_recipe, k[2], data, work, budgets, args.threads, k[0], k[1],
                                      args.log_every) for k in keys}
            study = pool.submit(ema_study, data, work, budgets, args.threads) if args.ema_study else None
            runs = {k: f.result() for k, f in futures.items()}
            study_scores = study.result() if study else None
        ckpt = {(c, s, b): runs[c, s, "default"]["run_dir"] / "checkpoints" / f"ckpt-{b:08d}.pt"
                for c in couplings for s in seeds for b in budgets}
        baseline = per_pixel_baseline(ckpt[couplings[0], seeds[0], budgets[-1]])
        evaluated = {k: evaluate_cli(path)[0] for k, path in ckpt.items()}
        statement = next((line for line in evaluate_cli(ckpt[couplings[0], seeds[0], budgets[-1]])[1].splitlines()
                          if line.startswith("weights:")), "(no weights line)")
        print(f"\nper-pixel independent baseline: {baseline:.3f} bits/dim; uniform 5-bit bound: 5.000")
        print(f"`glow-dist evaluate` states: {statement}")

        def values(c: str, r: str, weights: str, b: int) -> list[float]:
            if weights == "evaluate":
                return [evaluated[c, s, b] if r == "default" else float("nan") for s in seeds]
            return [runs[c, s, r]["curves"][weights].get(b, float("nan")) for s in seeds]

        head = " | ".join(f"{b} steps" for b in budgets)
        result: dict = {"train": n_train, "test": n_test, "baseline_per_pixel": baseline, "seeds": seeds,
                        "budgets": budgets, "runs": [], "summary": [], "differences": [], "clipping": []}
        for c in couplings:
            print(f"\n### model.coupling={c}: test bits/dim, mean ± sd over {len(seeds)} seed(s)\n")
            print(f"| recipe | weights | {head} |")
            print("|" + "---|" * (2 + len(budgets)))
            for r in recipes:
                for weights in ("ema", "raw", "evaluate"):
                    if (weights == "ema" and "optim.ema_decay=0" in RECIPES[r]) or (weights == "evaluate"
                                                                                   and r != "default"):
                        continue
                    cells = [values(c, r, weights, b) for b in budgets]
                    label = {"ema": "EMA", "raw": "raw", "evaluate": "`evaluate` (default weights)"}[weights]
                    print(f"| {r} | {label} | " + " | ".join(_cell(v) for v in cells) + " |")
                    result["summary"].append({"coupling": c, "recipe": r, "weights": weights,
                                              "bpd": {b: _stats(v) for b, v in zip(budgets, cells, strict=True)}})
            # Paired by seed: the same seed gives the same initial weights and data order to both recipes.
            comparisons = [("default `evaluate` - default raw", "default", "evaluate", "default", "raw")]
            if "port" in recipes:
                comparisons.append(("default `evaluate` - port raw", "default", "evaluate", "port", "raw"))
            for r in recipes:
                if r in ("default", "port"):
                    continue
                if "optim.ema_decay=0" not in RECIPES[r]:
                    comparisons.append((f"{r} EMA - default EMA", r, "ema", "default", "ema"))
                comparisons.append((f"{r} raw - default raw", r, "raw", "default", "raw"))
            print("\nPaired differences (same seed), mean ± sd [min, max]; negative: the first is better\n")
            print(f"| difference | {head} |")
            print("|" + "---|" * (1 + len(budgets)))
            for label, r1, w1, r2, w2 in comparisons:
                cells = [[a - b for a, b in zip(values(c, r1, w1, bb), values(c, r2, w2, bb), strict=True)]
                         for bb in budgets]
                print(f"| {label} | " + " | ".join(_cell(v, signed=True, spread=True) for v in cells) + " |")
                result["differences"].append({"coupling": c, "difference": label,
                                              "per_seed": {b: v for b, v in zip(budgets, cells, strict=True)},
                                              "stats": {b: _stats(v) for b, v in zip(budgets, cells, strict=True)}})
            print("\nGradient clipping: logged steps whose gradient norm (before clipping) exceeded the recipe's "
                  "clip, per seed\n")
            print("| recipe | clip | clipped steps / logged steps | largest norm | median norm | skipped steps |")
            print("|---|---|---|---|---|---|")
            for r in recipes:
                clip = recipe_clip(r)
                norms = [runs[c, s, r]["grad_norm"] for s in seeds]
                counts = [sum(1 for v in n.values() if v > clip) if clip > 0 else None for n in norms]
                largest = max((max(n.values()) for n in norms if n), default=float("nan"))
                median = float(np.median([v for n in norms for v in n.values()])) if any(norms) else float("nan")
                clipped = " / ".join(f"{k if k is not None else '-'}/{len(n)}" for k, n in zip(counts, norms,
                                                                                             strict=True))
                skipped = [int(runs[c, s, r]["skipped"]) for s in seeds]
                print(f"| {r} | {clip:g} | {clipped} | {largest:.1f} | {median:.2f} | "
                      f"{' / '.join(map(str, skipped))} |")
                result["clipping"].append({"coupling": c, "recipe": r, "clip": clip, "clipped_steps": counts,
                                           "logged_steps": [len(n) for n in norms], "largest_norm": largest,
                                           "median_norm": median, "skipped_steps": skipped})
        for (c, s, r), run in runs.items():
            result["runs"].append({"coupling": c, "seed": s, "recipe": r, "overrides": RECIPES[r],
                                   "ema": run["curves"]["ema"], "raw": run["curves"]["raw"],
                                   "evaluate": ({b: evaluated[c, s, b] for b in budgets} if r == "default"
                                                else None)})
        if study_scores:
            print("\nEMA variants on one trajectory of the default recipe (affine, seed 0; test bits/dim; training "
                  "identical):\n")
            print(f"| average | {head} |")
            print("|" + "---|" * (1 + len(budgets)))
            for name, curve in study_scores.items():
                print(f"| {name} | " + " | ".join(f"{curve.get(b, float('nan')):.3f}" for b in budgets) + " |")
            result["ema_study"] = study_scores
        result["load_average"] = os.getloadavg()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
