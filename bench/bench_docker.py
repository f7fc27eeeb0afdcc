"""The Docker numbers of BENCHMARKS.md (issue 23), measured on a private engine of their own; prints tables.

    .venv/bin/python bench/bench_docker.py                  # about 10 minutes on 2 cores (as root; needs dockerd)
    .venv/bin/python bench/bench_docker.py --steps 600 --rounds 3
    .venv/bin/python bench/bench_docker.py --only train --root ~/.cache/glow-dist/docker   # an engine's built image

1. Builds: a fresh engine root (~/.cache/glow-dist/docker-bench, removed afterwards unless --keep), so the first
   `make docker-build GPUS=0` is cold: the debootstrap base (`launch/docker-base.sh`), the apt layer, the venv from
   wheelhouse/cpu (made first if missing, timed on its own). Then the same command again: the warm build (every layer
   cached; what `make docker-train` pays before each run).
2. Sizes: the CPU image and its layers.
   --flavour gpu: the same for the GPU image built offline from --gpu-wheelhouse (wheelhouse/cu13) on the
   debootstrap base (`make docker-build FLAVOUR=gpu GPU_WHEELHOUSE=...`; issue 34), and against it: the wheels its
   venv was installed from (the wheelhouse's files that `pip list` in the image names), the venv before the build
   stage's trim step (its install layers) and after it (the image's venv layer), and `docker history`.
       .venv/bin/python bench/bench_docker.py --flavour gpu --only build --root ~/.cache/glow-dist/docker-test
   On an engine root that already has the GPU image's layers, the first build is not cold (the script says so).
3. Training: the digits, 2 Gloo ranks, the same command lines `make docker-train` and `make train` run (read from
   `make -n`, so they cannot drift), alternated --rounds times: time from launch to the first logged step (log_every
   1), and steps/s between step 50 and the last (from metrics.jsonl's timestamps; host and container share a clock).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "dockerd-private.sh"
IMAGE = "glow-dist:bench"


def sh(cmd: list[str], env: dict, timeout: float = 3600) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        sys.exit(f"bench_docker: {' '.join(cmd[:4])} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout + out.stderr


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    sh(cmd, env)
    return time.perf_counter() - t0


def make_line(target: str, env: dict, *args: str) -> str:
    """The horovodrun line `make -n TARGET` would run, continuation lines joined."""
    text = sh(["make", "-n", "--no-print-directory", target, *args], env).replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if "glow-dist-horovodrun" in x]
    return line


def train_once(line: str, run_dir: Path, env: dict) -> tuple[float, float]:
    """(seconds from launch to the first logged step, steps/s from step 50 to the last)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    launched_ms = time.time() * 1000
    sh(["bash", "-c", line], env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["time_ms"]) for r in rows if "bits_per_dim/train" in r["metrics"]]
    first = train[0][1] - launched_ms
    (s0, t0), (s1, t1) = next(x for x in train if x[0] >= 50), train[-1]
    return first / 1000, (s1 - s0) / ((t1 - t0) / 1000)


def layer_sizes(env: dict, image: str = IMAGE) -> list[tuple[int, str]]:
    """(bytes, the instruction) per layer of the image, newest first."""
    out = sh(["docker", "history", "--human=false", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image], env)
    return [(int(size), created) for size, created in (x.split("\t", 1) for x in out.splitlines())]


def wheel_key(name: str, version: str) -> str:
    """A distribution as both a wheel's file name and `pip list` spell it (PEP 503 name, version)."""
    return f"{name.lower().replace('-', '_').replace('.', '_')}=={version}"


def installed_wheels_gb(env: dict, image: str, house: Path) -> tuple[float, int, float]:
    """(GB of the wheelhouse's wheels that the image's venv holds, how many, GB of the whole wheelhouse)."""
    frozen = sh(["docker", "run", "--rm", "--network", "none", image, "pip", "list", "--format", "freeze"], env)
    installed = {wheel_key(*line.split("==", 1)) for line in frozen.splitlines() if "==" in line}
    wheels = list(house.glob("*.whl"))
    used = [w for w in wheels if wheel_key(*w.name.split("-")[:2]) in installed]
    return sum(w.stat().st_size for w in used) / 1e9, len(used), sum(w.stat().st_size for w in wheels) / 1e9


def gpu_builds(env: dict, house: str) -> dict[str, str]:
    """The GPU image from a CUDA wheelhouse on the debootstrap base: build times, sizes, what the trim step saved."""
    results: dict[str, str] = {}
    if not (REPO / house / "requirements.txt").exists():
        sys.exit(f"bench_docker: no {house}; make it first: make wheelhouse CUDA=cu13 WHEELHOUSE={house}")
    have = subprocess.run(["docker", "image", "inspect", "debian-local:bookworm"], env=env, capture_output=True)
    if have.returncode != 0:
        results["base image: debootstrap + docker import"] = \
            f"{timed(['bash', 'launch/docker-base.sh', 'debian-local:bookworm'], env):.0f} s"
    build = ["make", "--no-print-directory", "docker-build", "FLAVOUR=gpu", f"GPU_WHEELHOUSE={house}"]
    t0 = time.perf_counter()
    out = sh([*build, f"IMAGE={IMAGE}-gpu"], env)
    first = time.perf_counter() - t0
    steps, cached = out.count("\nStep "), out.count("Using cache")
    results[f"first build ({cached} of {steps} steps from the layer cache)"] = f"{first:.0f} s"
    results["warm build (all cached; the wheelhouse sent again as the context)"] = \
        f"{timed([*build, f'IMAGE={IMAGE}-gpu'], env):.1f} s"
    sh([*build, f"IMAGE={IMAGE}-gpu-build", "DOCKER_TARGET=build"], env)  # the build stage, for its layers
    size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", f"{IMAGE}-gpu"], env).strip())
    results["GPU image size"] = f"{size / 1e9:.2f} GB"
    layers = layer_sizes(env, f"{IMAGE}-gpu")
    venv = max(s for s, _ in layers)  # COPY --from=build /opt/venv
    (system,) = [s for s, created in layers if "apt-get install" in created and "openssh-server" in created]
    (compilers,) = [s for s, created in layers if "apt-get install" in created and "gcc libc6-dev" in created]
    results["  of which: debootstrap base / apt layer / C compiler for Triton / venv / project and the rest"] = \
        f"{layers[-1][0] / 1e9:.2f} / {system / 1e9:.2f} / {compilers / 1e9:.2f} / {venv / 1e9:.2f} / " \
        f"{(size - layers[-1][0] - system - compilers - venv) / 1e9:.3f} GB"
    stage = layer_sizes(env, f"{IMAGE}-gpu-build")
    copied = next(s for s, created in stage if "COPY" in created and "/tmp/wheelhouse" in created)
    installs = sum(s for s, created in stage if "pip install" in created or "install-horovod" in created)
    results["venv before the trim step (the build stage's install layers)"] = f"{installs / 1e9:.2f} GB"
    results["venv in the image (after the trim)"] = f"{venv / 1e9:.2f} GB ({(installs - venv) / 1e6:.0f} MB trimmed)"
    used, count, total = installed_wheels_gb(env, f"{IMAGE}-gpu", REPO / house)
    results[f"wheels the venv was installed from ({house})"] = \
        f"{used:.2f} GB, {count} wheels (the whole wheelhouse: {total:.2f} GB, with the test tools and build helpers)"
    results["the wheelhouse in the build stage (not in the image)"] = f"{copied / 1e9:.2f} GB"
    print("\ndocker history of the GPU image (newest first)\n\n| size | instruction |\n|---|---|")
    for size_b, created in layers:
        created = created.replace("/bin/sh -c #(nop) ", "").replace("/bin/bash -o pipefail -c ", "RUN ")
        short = created.replace("|", "\\|")[:110] + ("..." if len(created) > 110 else "")
        print(f"| {size_b / 1e6:.1f} MB | `{short}` |")
    return results


def builds(env: dict, gpu_base_gb: float | None, gpu_venv_gb: float) -> dict[str, str]:
    results: dict[str, str] = {}
    if not (REPO / "wheelhouse" / "cpu" / "requirements.txt").exists():
        results["wheelhouse/cpu (make wheelhouse, Horovod from the wheel cache)"] = \
            f"{timed(['make', 'wheelhouse/cpu/requirements.txt'], env):.0f} s"
    results["base image: debootstrap + docker import"] = \
        f"{timed(['bash', 'launch/docker-base.sh', 'debian-local:bookworm'], env):.0f} s"
    build = ["make", "--no-print-directory", "docker-build", "GPUS=0", f"IMAGE={IMAGE}"]
    results["cold build (apt layer, venv from the wheelhouse)"] = f"{timed(build, env):.0f} s"
    results["warm build (all cached; context sent again)"] = f"{timed(build, env):.1f} s"
    size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], env).strip())
    results["CPU image size"] = f"{size / 1e9:.2f} GB"
    layers = layer_sizes(env)
    venv = max(s for s, _ in layers)  # COPY --from=build /opt/venv
    base = layers[-1][0]
    (system,) = [s for s, created in layers if "apt-get install" in created]
    results["  of which: debootstrap base / apt layer / venv"] = \
        f"{base / 1e9:.2f} / {system / 1e9:.2f} / {venv / 1e9:.2f} GB"
    gpu_rest = system / 1e9 + 0.35 + gpu_venv_gb  # + build-essential, python3-dev, git (about 350 MB)
    results["GPU image size, estimated from its layers"] = (
        f"{gpu_rest + gpu_base_gb:.1f} GB" if gpu_base_gb is not None else
        f"CUDA base + {gpu_rest:.1f} GB (apt {system / 1e9 + 0.35:.2f}, venv {gpu_venv_gb:.1f})")
    return results


def training(env: dict, steps: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """The `make docker-train` and `make train` command lines, alternated."""
    runs: dict[str, list[tuple[float, float]]] = {"inside": [], "outside": []}
    with tempfile.TemporaryDirectory(prefix="bench-docker-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "digits"
        sh([sys.executable, "-m", "glow_dist", "prepare", "digits", "--out", str(data)], env)
        train_args = (f"TRAIN_ARGS=train.steps={steps} train.log_every=1 train.eval_every=0 train.sample_every=0 "
                      f"train.checkpoint_every=0 train.progress=false tracking.local_dir={tmp_path / 'mlflow'}")
        common = [f"DATA={data}", f"MLFLOW_DIR={tmp_path / 'mlflow'}", train_args]
        inside = make_line("docker-train", env, "GPUS=0", f"IMAGE={IMAGE}", f"RUN_DIR={tmp_path / 'in'}",
                           "CONTAINER=glow-dist-bench", *common)
        outside = make_line("train", env, f"RUN_DIR={tmp_path / 'out'}", *common)
        env_out = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
        for _ in range(rounds):
            runs["inside"].append(train_once(inside, tmp_path / "in", env))
            runs["outside"].append(train_once(outside, tmp_path / "out", env_out))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache" / "glow-dist" / "docker-bench")
    ap.add_argument("--keep", action="store_true", help="keep the engine's root (images, layer cache)")
    ap.add_argument("--only", choices=["build", "train"], help="only the builds and sizes, or only the training")
    ap.add_argument("--flavour", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: the GPU image from --gpu-wheelhouse on the debootstrap base (builds and sizes only)")
    ap.add_argument("--gpu-wheelhouse", default="wheelhouse/cu13", help="the CUDA wheelhouse, inside the checkout")
    ap.add_argument("--gpu-base-gb", type=float, default=None, help="the CUDA base image's size, if known")
    ap.add_argument("--gpu-venv-gb", type=float, default=6.9, help="the GPU venv's size (docs/install.md: cu13)")
    args = ap.parse_args()

    env = {**os.environ, "GLOW_DIST_DOCKER_ROOT": str(args.root)}
    fresh = not args.root.exists()
    print(f"bench_docker: engine root {args.root} ({'fresh' if fresh else 'existing: the first build is not cold'})")
    # An engine already running on this root (a test session's, or one the user started) is used and left running.
    ours = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True).returncode != 0
    sh(["bash", str(SCRIPT), "start"], env, timeout=300)
    env["DOCKER_HOST"] = f"unix://{args.root / 'dockerd.sock'}"
    results, runs = {}, {}
    try:
        if args.flavour == "gpu":
            results = gpu_builds(env, args.gpu_wheelhouse)
        elif args.only != "train":
            results = builds(env, args.gpu_base_gb, args.gpu_venv_gb)
        else:  # the image as this root has it (built if missing)
            sh(["make", "--no-print-directory", "docker-build", "GPUS=0", f"IMAGE={IMAGE}"], env)
        if args.only != "build" and args.flavour == "cpu":
            runs = training(env, args.steps, args.rounds)
    finally:
        if ours:
            sh(["bash", str(SCRIPT), "stop"], env, timeout=300)
        if fresh and not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)

    if results:
        print(f"\nBuilds and sizes (load average {os.getloadavg()[0]:.1f})\n")
        print("| what | measured |\n|---|---|")
        for k, v in results.items():
            print(f"| {k} | {v} |")
    if runs:
        print(f"\nDigits, 2 Gloo ranks, {args.steps} steps, {args.rounds} rounds alternated (`make docker-train` vs "
              f"`make train` command lines; load average at the end {os.getloadavg()[0]:.1f})\n")
        print("| round | time to the first step inside / outside (s) | steps/s inside / outside (from step 50) | "
              "ratio |\n|---|---|---|---|")
        for i, ((f_in, s_in), (f_out, s_out)) in enumerate(zip(runs["inside"], runs["outside"], strict=True)):
            print(f"| {i + 1} | {f_in:.1f} / {f_out:.1f} | {s_in:.2f} / {s_out:.2f} | {s_in / s_out:.3f} |")
        ratios = sorted(a[1] / b[1] for a, b in zip(runs["inside"], runs["outside"], strict=True))
        print(f"\nsteps/s inside / outside, median of the rounds: {ratios[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    main()
