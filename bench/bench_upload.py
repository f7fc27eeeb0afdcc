"""What an MLflow checkpoint upload (`tracking.log_checkpoints`, default `last`) costs the training thread: the
upload itself, done where training waits (before: the Tracker's call on the training thread) vs. handed to the
upload thread (glow_dist/tracking/uploads.py); prints a table.

    .venv/bin/python bench/bench_upload.py                     # 2.75 GiB (CelebA-HQ 256's checkpoint), 3 repetitions
    .venv/bin/python bench/bench_upload.py --gib 1 --repeats 5 --dir /shared/runs

A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts under the same directory, one worker) takes
the uploads, as a team's tracking server does; a remote server adds its network. Each repetition, on files of random
bytes and their sidecars (written and synced to disk first, as a finished checkpoint is):
- sync: the whole upload on the calling thread through the run's artifact repository (the checkpoint, its sidecar
  and the rotation of `checkpoints/`, which deletes the previous one: what `Tracker.log_checkpoint` did before),
  i.e. the training stall then;
- async: `Tracker.log_checkpoint` returning (the training stall now), and how long until the upload and its rotation
  have landed and the run is closed (`Tracker.finish` waits for them, as the end of a run does): time the upload
  thread works while training goes on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from glow_dist.config import load_config
from glow_dist.tracking.client import make_tracker
from glow_dist.tracking.uploads import rotate_checkpoints

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115  (the server keeps writing to it)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server not healthy in 180 s")


def make_checkpoint(folder: Path, step: int, nbytes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.write(block[: nbytes % len(block)])
    (folder / f"{path.name}.sha256").write_text(f"{'0' * 64}  {path.name}\n")
    os.sync()   # each upload starts with the disk's writeback idle, not behind this file's dirty pages
    return path


def upload(repo: Any, path: Path) -> None:
    """What Tracker.log_checkpoint did on the training thread before: the checkpoint, its sidecar, the rotation."""
    repo.log_artifact(str(path), "checkpoints")
    repo.log_artifact(str(path) + ".sha256", "checkpoints")
    rotate_checkpoints(repo, "last", 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / "runs", help="where the run and the server store live")
    parser.add_argument("--gib", type=float, default=2.75, help="checkpoint size (CelebA-HQ 256: 2.75 GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_upload-", dir=args.dir))
    server, uri = start_server(work)
    nbytes = int(args.gib * 2**30)
    print(f"checkpoint {nbytes / 2**30:.2f} GiB; mlflow server {uri} (artifacts in {work}); load average "
          f"{os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores", flush=True)
    rows = []
    try:
        cfg = load_config(None, [f"tracking.uri={uri}", f"train.run_dir={work / 'run'}",
                                 f"tracking.local_dir={work / 'mlflow'}", "tracking.system_metrics=false",
                                 "tracking.log_checkpoints=last"])
        for i in range(args.repeats):
            tracker = make_tracker(cfg)
            repo = tracker.artifact_repository()
            folder = work / "run" / "checkpoints"
            seed, before, now = (make_checkpoint(folder, 10 * i + k, nbytes) for k in (1, 2, 3))
            upload(repo, seed)   # so that both measured uploads also rotate one checkpoint away, as in a run
            t0 = time.perf_counter()
            upload(repo, before)
            sync = time.perf_counter() - t0
            t0 = time.perf_counter()
            tracker.log_checkpoint(now, 10 * i + 3)
            stall = time.perf_counter() - t0
            tracker.finish()
            landed = time.perf_counter() - t0
            names = [f.path for f in repo.list_artifacts("checkpoints")]
            assert names == [f"checkpoints/{now.name}", f"checkpoints/{now.name}.sha256"], names
            rows.append((sync, stall, landed))
            print(f"repeat {i + 1}: sync {sync:.2f} s; async stall {stall:.3f} s, landed after {landed:.2f} s",
                  flush=True)
            for path in (seed, before, now):
                path.unlink()
                Path(str(path) + ".sha256").unlink()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| run | upload where training waits (before) | training stall now (log_checkpoint returns) | "
          "upload lands (background) | MB/s |\n|---|---|---|---|---|")
    for i, (sync, stall, landed) in enumerate(rows, 1):
        print(f"| {i} | {sync:.2f} s | {stall:.3f} s | {landed:.2f} s | {nbytes / landed / 1e6:.0f} |")
    med = [statistics.median(r[k] for r in rows) for k in range(3)]
    print(f"| median | {med[0]:.2f} s | {med[1]:.3f} s | {med[2]:.2f} s | {nbytes / med[2] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
