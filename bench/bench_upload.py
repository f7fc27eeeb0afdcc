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

With `--store s3`, the server is the cluster's: launch/mlflow-server.sh on PostgreSQL (its own cluster, initdb) with
artifacts proxied onto an S3 bucket of a SeaweedFS server (tests/postgres_server.py, tests/object_store.py), one
worker, and the one checkpoint goes up through `Tracker.log_checkpoint` (the upload thread, the training client's
settings) under each client setting side by side: MLflow's MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD off (the file is
streamed through the server, which spools it to its disk, then copies it to the bucket), and on with each
MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE of --chunks-mb (the server hands out presigned part URLs; the parts go to the
object store directly, MLflow's thread pool in parallel); the table has MB/s, the server's peak RSS (all its
processes) and the client's RSS growth (parts are read whole into memory):

    .venv/bin/python bench/bench_upload.py --store s3 --dir runs --repeats 2 --chunks-mb 10,32,100
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from glow_dist.config import load_config
from glow_dist.tracking.client import make_tracker
from glow_dist.tracking.uploads import rotate_checkpoints

REPO = Path(__file__).resolve().parents[1]
# The client settings compared by --store s3 (MLflow's variables, read by its artifact client at each upload).
PROXY_MULTIPART, CHUNK_SIZE = "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE"


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


class PeakRss:
    """Peak resident memory of a process and its children (summed), sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_s3_server(work: Path) -> tuple[Any, Any, subprocess.Popen, str]:
    """PostgreSQL and SeaweedFS (the test suite's fixtures, one implementation of each) and launch/mlflow-server.sh
    on them; the S3 keys and the database password only in the server's environment."""
    sys.path.insert(0, str(REPO / "tests"))
    from object_store import SeaweedS3
    from postgres_server import PostgresServer

    database = PostgresServer().start()
    database.create_database("mlflow", "mlflow", "bench-password")
    store = SeaweedS3(work / "seaweedfs").start()
    store.make_bucket("mlflow")
    port = free_port()
    env = {**store.env(), "BACKEND_STORE_URI": database.uri("mlflow", "mlflow", "bench-password"),
           "ARTIFACTS_DESTINATION": "s3://mlflow/artifacts", "MLFLOW_HOME": str(work / "server"), "PORT": str(port),
           "WORKERS": "1", "MLFLOW": str(Path(sys.executable).with_name("mlflow")), "TMPDIR": str(work),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(work / "server.log", "w")  # noqa: SIM115  (the server keeps writing to it)
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "mlflow-server.sh")], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return database, store, proc, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server not healthy in 180 s")


def compare_multipart(folder: Path, nbytes: int, repeats: int, chunks_mb: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_upload_s3-", dir=folder))
    # (proxy multipart, chunk MB, MLFLOW_HTTP_REQUEST_TIMEOUT or None: the Tracker's default, 5 s)
    settings = [("off", None, None), ("off", None, "900")] + [("on", mb, None) for mb in chunks_mb]
    database = store = server = None
    rows: list[tuple[str, str, list[float], list[int], list[int], int]] = []
    baseline = 0
    try:
        database, store, server, uri = start_s3_server(work)
        checkpoint = make_checkpoint(work / "run" / "checkpoints", 1, nbytes)
        bucket = store.client()
        print(f"checkpoint {nbytes / 2**30:.2f} GiB; {uri}: launch/mlflow-server.sh, PostgreSQL, artifacts on "
              f"s3://mlflow/artifacts (SeaweedFS {store.endpoint}), 1 worker; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
        baseline = PeakRss(server.pid).now()
        print(f"server RSS before the uploads: {baseline / 2**20:.0f} MiB", flush=True)
        for proxy, mb, timeout in settings:
            os.environ[PROXY_MULTIPART] = "true" if proxy == "on" else "false"
            for name, value in ((CHUNK_SIZE, mb and str(mb << 20)), ("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)):
                os.environ.pop(name, None)
                if value:
                    os.environ[name] = value
            label = f"{proxy}{f', request timeout {timeout} s' if timeout else ''}"
            times, server_peaks, client_growth, failures = [], [], [], 0
            for i in range(repeats):
                cfg = load_config(None, [f"tracking.uri={uri}", f"train.run_dir={work / 'run'}",
                                         f"tracking.local_dir={work / 'mlflow'}", "tracking.system_metrics=false",
                                         "tracking.log_checkpoints=last", f"tracking.run_name=upload-{i}"])
                tracker = make_tracker(cfg)
                client = PeakRss(os.getpid())
                with PeakRss(server.pid) as server_rss, client:
                    before = client.peak
                    t0 = time.perf_counter()
                    tracker.log_checkpoint(checkpoint, 1)
                    tracker.finish()
                    landed = time.perf_counter() - t0
                key = f"artifacts/{tracker.experiment_id}/{tracker.run_id}/artifacts/checkpoints/{checkpoint.name}"
                try:
                    size = bucket.head_object(Bucket="mlflow", Key=key)["ContentLength"]
                except Exception:  # noqa: BLE001 - not there: the upload failed (its warning is printed above)
                    size = -1
                if size != nbytes:
                    failures += 1
                else:
                    times.append(landed)
                server_peaks.append(server_rss.peak)
                client_growth.append(client.peak - before)
                print(f"proxy multipart {label}, chunk {mb or '-'} MB, repeat {i + 1}: {landed:.2f} s, "
                      f"{'ok' if size == nbytes else 'NOT UPLOADED'}; server peak RSS {server_rss.peak / 2**20:.0f} "
                      f"MiB, client RSS +{(client.peak - before) / 2**20:.0f} MiB", flush=True)
                with contextlib.suppress(Exception):
                    bucket.delete_object(Bucket="mlflow", Key=key)
                # SeaweedFS frees a deleted object's space when its volume is vacuumed
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{store.master_port}/vol/vacuum?garbageThreshold=0.0001",
                                           timeout=120).read()
            rows.append((label, f"{mb} MB" if mb else "-", times, server_peaks, client_growth, failures))
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 15)
            server.wait(timeout=60)
        for thing in (store, database):
            if thing is not None:
                thing.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nserver RSS before the uploads {baseline / 2**20:.0f} MiB (the mlflow server and its uvicorn worker)")
    print("\n| MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD | chunk | upload lands (median) | MB/s | runs (s) | "
          "peak server RSS | client RSS growth |\n|---|---|---|---|---|---|---|")
    for proxy, chunk, times, server_peaks, client_growth, failures in rows:
        landed = statistics.median(times) if times else 0.0
        shown = ", ".join([f"{t:.1f}" for t in times] + ["not uploaded"] * failures)
        speed = f"{landed:.2f} s | {nbytes / landed / 1e6:.0f}" if times else "not uploaded | -"
        print(f"| {proxy} | {chunk} | {speed} | {shown} | "
              f"{max(server_peaks) / 2**20:.0f} MiB | {max(client_growth) / 2**20:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / "runs", help="where the run and the server store live")
    parser.add_argument("--gib", type=float, default=2.75, help="checkpoint size (CelebA-HQ 256: 2.75 GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="local: sqlite + a folder (sync vs async); s3: PostgreSQL + S3, multipart settings")
    parser.add_argument("--chunks-mb", default="10,32,100", help="--store s3: MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZEs")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.store == "s3":
        compare_multipart(args.dir, int(args.gib * 2**30), args.repeats,
                          [int(mb) for mb in args.chunks_mb.split(",") if mb])
        return
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
