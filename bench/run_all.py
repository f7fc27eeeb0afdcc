"""The benchmark suite (`make bench`): runs every bench/ script with small settings, then prints one summary table.

    .venv/bin/python bench/run_all.py                     # everything (about 7 minutes on an idle 2-core VM)
    .venv/bin/python bench/run_all.py --only train memory
    .venv/bin/python bench/run_all.py --only gpu          # on a CUDA machine (included by default there)

Each script's own output (and table) is echoed as it runs; the summary lists each goal of issue 7 with the
measured value. BENCHMARKS.md has the full tables and the commands to reproduce each one on its own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent

# name -> (script, arguments): small settings, so the suite finishes in minutes.
SUITE: dict[str, tuple[str, list[str]]] = {
    "train": ("bench_train.py", ["--rounds", "3"]),
    "train-1-thread": ("bench_train.py", ["--rounds", "3", "--threads", "1", "--variants", "default", "nchw"]),
    "scaling": ("bench_scaling.py", ["--repeats", "3", "--steps", "4"]),
    "data": ("bench_data.py", ["--images", "256", "--workers", "2", "--repeats", "1", "--epochs", "1"]),
    "memory": ("bench_memory.py", []),
    "sampling": ("bench_sampling.py", ["--batch-sizes", "1", "--repeats", "1"]),
    # Only where CUDA is present (issue 13): every variant at each architecture's smaller batch, JSON beside it.
    # Sampling eager vs graphed only: compiling the 192-step CelebA-HQ decoder takes minutes per batch size.
    "gpu": ("bench_gpu.py", ["--quick", "--sample-modes", "eager", "graphed", "--json", "bench_gpu.json"]),
}
GPU_ONLY = {"gpu"}
# bench_gpu.py's targets (issue 13, one H100): img/s per (architecture, batch); sampling ms/image per batch.
GPU_GOALS = {("cifar10", "64"): ">= 1500 img/s", ("cifar10", "256"): ">= 2500 img/s",
             ("celeba_hq_256", "16"): ">= 75 img/s"}
SAMPLING_GOALS = {"1": "<= 40 ms/image", "32": "<= 6 ms/image"}


def cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def tables(text: str) -> list[dict[str, str]]:
    """The rows of every markdown table in `text`, as {header: cell}."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def column(rows: list[dict[str, str]], prefix: str) -> str:
    """Name of the first column whose header starts with `prefix`."""
    return next((k for k in rows[0] if k.startswith(prefix)), "") if rows else ""


def summarize(name: str, rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(measure, value, goal) lines for the summary table."""
    if not rows:
        return [(name, "no table (see the output above)", "")]
    if name.startswith("train"):
        best = max(rows, key=lambda r: float(r["images/s"]))
        return [(f"{name}: {rows[0]['variant']} fraction of fp32 matmul", f"{rows[0]['fraction of matmul']} "
                 f"({rows[0]['images/s']} img/s)", ">= 0.75"),
                (f"{name}: fastest variant ({best['variant']})",
                 f"{best['fraction of matmul']} ({best['images/s']} img/s, {best[column(rows, 'vs ')]})", ">= 0.75")]
    if name == "scaling":
        last = rows[-1]
        return [(f"scaling: np={last['ranks']} vs np={rows[0]['ranks']}", last[column(rows, "speedup")], ">= 1.8x")]
    if name == "data":
        last = rows[-1]
        return [(f"data: DALI / webdataset+PIL at {last['threads / workers']} workers", last["DALI / wds"], "")]
    if name == "memory":
        growth, err, trained = column(rows, "growth"), column(rows, "fp64 grad"), column(rows, "trained")
        out = [(f"memory: {r['memory']} growth (peak / saved)", r[growth], "< +10% (invertible)") for r in rows]
        out += [("memory: invertible vs plain grads, fp64 (all / worst tensor)", r[err], "<= 1e-5")
                for r in rows if r["memory"] == "invertible"]
        out += [("memory: invertible vs plain grads, fp32, trained model (floor)", r[trained], "<= 1e-5")
                for r in rows if r["memory"] == "invertible" and trained]
        return out
    if name == "gpu":
        out = [(f"gpu: {r['architecture']} batch {r['batch']} {r['variant']} ({r['ran as']})",
                f"{r['img/s']} img/s, {r['ms/step']} ms, {r['fraction of TF32 matmul']} of TF32 matmul"
                if r["img/s"] else r["ms/step"],
                GPU_GOALS.get((r["architecture"], r["batch"]), "")) for r in rows if "architecture" in r]
        sampling = [r for r in rows if "ms/image" in r]
        mode = column(sampling, "sampling")
        out += [(f"gpu: sampling CelebA-HQ 256 batch {r['batch']} {r.get(mode, '')} ({r.get('ran as', '')})",
                 f"{r['ms/image']} ms/image", SAMPLING_GOALS.get(r["batch"], "")) for r in sampling]
        return out
    if name == "sampling":
        return [(f"sampling: CelebA-HQ 256, batch {r['batch']}", f"{r[k]} {k}", "")
                for r in rows for k in r if k.endswith("ms/image")]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE))
    args = parser.parse_args()
    if args.only is None:
        args.only = [n for n in SUITE if n not in GPU_ONLY or cuda_present()]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    summary: list[tuple[str, str, str]] = []
    for name in args.only:
        script, script_args = SUITE[name]
        path = BENCH / script
        if not path.is_file():
            summary.append((name, f"skipped: {script} not found", ""))
            continue
        cmd = [sys.executable, str(path), *script_args]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], flush=True)
            summary.append((name, f"FAILED (exit {done.returncode})", ""))
            continue
        try:
            summary += summarize(name, tables(done.stdout))
        except (KeyError, ValueError, IndexError) as e:
            summary.append((name, f"unparsed table ({e!r})", ""))
    print(f"\n=== summary (load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
