"""Damaged data never crashes, hangs or silently changes a job: each test makes its own damaged copy of the digits
shards (`glow-dist prepare digits`, prepared once per session) and reads it as training would, on both backends, with
2 real Horovod ranks where the job's behaviour is the point."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BASE, BIN, REPO, assert_identical, env_with_venv, load_ckpt
from mlflow.tracking import MlflowClient
from PIL import Image

from glow_dist.cli import main as cli
from glow_dist.config import DataConfig, ModelConfig, load_config
from glow_dist.data import make_loader, read_manifest
from glow_dist.data.manifest import read_index
from glow_dist.data.samples import PNG_SIGNATURE, check_sample, image_header
from glow_dist.data.shards import write_index
from glow_dist.data.verify import verify_split
from glow_dist.preflight.doctor import check_data

BACKENDS = ("dali", "webdataset")
LINE = "glow-dist train: data error:"
MODEL = ModelConfig(image_size=8, channels=1)
Members = list[tuple[str, bytes]]


# --- damage, done the way it happens to real copies ------------------------------------------------------------------

def copy_of(shards: Path, tmp_path: Path, name: str = "copy") -> Path:
    root = tmp_path / name
    shutil.copytree(shards, root)
    return root


def entry(root: Path, split: str, shard: int) -> dict:
    return read_manifest(root)["splits"][split]["shards"][shard]


def flip_in_place(root: Path, split: str = "train", shard: int = 1, sample: int = 400, at: int = 0,
                  n: int = 24) -> str:
    """Bit rot: n bytes of one PNG inverted where they lie (sizes and index offsets unchanged); returns the key."""
    e = entry(root, split, shard)
    offset, _ = read_index(root / e["index"])[sample]["png"]
    with open(root / e["file"], "r+b") as f:
        f.seek(offset + at)
        data = f.read(n)
        f.seek(offset + at)
        f.write(bytes(b ^ 0xFF for b in data))
    return f"{e['file']}:{shard * 500 + sample:07d}" if split == "train" else f"{e['file']}:{sample:07d}"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A small, valid PNG file whose header declares width x height grey pixels (a decompression bomb)."""
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b""))


def png_of(size: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size), 200, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def rewrite_shard(root: Path, split: str, shard: int, edit: Callable[[Members], Members],
                  manifest_follows: bool = True) -> None:
    """Rewrite one shard and its index with `edit`; with `manifest_follows` the manifest's count and sha256 are
    updated as the tool that wrote the shard would (so only the samples themselves are wrong)."""
    e = entry(root, split, shard)
    path = root / e["file"]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    count = write_index(path, root / e["index"])
    if manifest_follows:
        manifest = read_manifest(root)
        listed = manifest["splits"][split]["shards"][shard]
        listed.update(num_samples=count, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def replace(key: str, ext: str, data: bytes) -> Callable[[Members], Members]:
    return lambda members: [(n, data if n == f"{key}.{ext}" else d) for n, d in members]


def set_manifest_count(root: Path, split: str, shard: int, count: int) -> None:
    manifest = read_manifest(root)
    manifest["splits"][split]["shards"][shard]["num_samples"] = count
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def bad_test_split(shards: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy whose test shard (180 samples, in order: rank 0 evaluates 0.., rank 1 90..) holds four bad samples,
    written by a tool that also wrote the manifest: a 40000x40000 header, a 16x16 image, a PNG whose first 24 bytes
    are flipped (the bytes that crashed DALI), and a label out of range for a 10-class model."""
    root = copy_of(shards, tmp_path, "bad-samples")
    rewrite_shard(root, "test", 0, replace("0000003", "png", bomb_png()))
    rewrite_shard(root, "test", 0, replace("0000007", "png", png_of(16)))
    rewrite_shard(root, "test", 0, replace("0000100", "cls", b"12"))
    flip_in_place(root, "test", 0, 95)
    rewrite_shard(root, "test", 0, lambda members: members)  # the manifest follows the flip too
    return root, ["test-000000.tar:0000003", "test-000000.tar:0000007", "test-000000.tar:0000095",
                  "test-000000.tar:0000100"]


# --- in one process --------------------------------------------------------------------------------------------------

def test_headers_are_read_before_pixels() -> None:
    for size, mode, channels in ((8, "L", 1), (12, "RGB", 3)):
        for fmt in ("PNG", "JPEG"):
            out = io.BytesIO()
            Image.new(mode, (size, size + 1)).save(out, format=fmt)
            assert image_header(out.getvalue()) == (size, size + 1, channels)
    assert "declares 40000x40000" in check_sample(bomb_png(), b"1", "png", 8, 1, 10)
    good = png_of(8)
    assert check_sample(good, b"1", "png", 8, 1, 10) is None
    assert "16x16" in check_sample(png_of(16), b"1", "png", 8, 1, 10)
    rotten = bytearray(good)
    rotten[40] ^= 0xFF  # inside IDAT
    assert "fails its CRC" in check_sample(bytes(rotten), b"1", "png", 8, 1, 10)
    assert "neither PNG nor JPEG" in check_sample(bytes(b ^ 0xFF for b in good[:24]) + good[24:], b"1", "png", 8, 1,
                                                  10)
    assert "outside 0..9" in check_sample(good, b"12", "png", 8, 1, 10)
    assert check_sample(good, b"12", "png", 8, 1, -1) is None  # an unconditional model does not read labels


def test_verify_names_the_shard_and_hashes_unchanged_files_once(digits_shards: Path, tmp_path: Path) -> None:
    root = copy_of(digits_shards, tmp_path)
    cache = tmp_path / "cache.json"
    manifest = read_manifest(root)
    size = sum((root / s["file"]).stat().st_size for s in manifest["splits"]["train"]["shards"])
    first = verify_split(root, manifest, "train", "auto", cache=cache)
    assert not first.problems and not first.bad and first.hashed_bytes == size
    again = verify_split(root, manifest, "train", "auto", cache=cache)
    assert again.hashed_bytes == 0 and again.cached_shards == 4  # the next job on unchanged files reads nothing
    assert verify_split(root, manifest, "train", "always", cache=cache).hashed_bytes == size
    shard = root / "train-000001.tar"
    stat = shard.stat()
    flip_in_place(root, sample=10, at=40)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # rot that leaves size and mtime alone
    assert not verify_split(root, manifest, "train", "auto", cache=cache).problems   # remembered: only `always`...
    (line,) = verify_split(root, manifest, "train", "always", cache=cache).problems   # ... reads it again
    assert line.startswith(f"shard {shard} differs from manifest.json: sha256 ")
    assert "copy the shard and its .idx again" in line and "glow-dist prepare" in line
    os.utime(shard)  # a copy or a touch changes the file's identity: auto hashes it again
    found = verify_split(root, manifest, "train", "auto", cache=cache)
    assert found.problems == [line] and found.hashed_bytes == stat.st_size
    # `glow-dist doctor --data` says the same
    cfg = load_config(REPO / "configs" / "debug.yaml", ["data.verify=always"])
    checks = {c.name: c for c in check_data(cfg, str(root), check_shape=True)}
    assert checks["verify:train"].status == "FAIL" and checks["verify:train"].detail == line
    assert checks["verify:test"].status == "PASS"


def test_count_mismatches_are_found_without_reading_a_shard(digits_shards: Path, tmp_path: Path) -> None:
    fewer = copy_of(digits_shards, tmp_path, "fewer")
    rewrite_shard(fewer, "train", 1, lambda members: members[: 3 * 483], manifest_follows=False)
    (line,) = verify_split(fewer, read_manifest(fewer), "train", "never").problems
    assert f"shard {fewer / 'train-000001.tar'} holds 483 samples" in line and "says 500" in line
    larger = copy_of(digits_shards, tmp_path, "larger")
    set_manifest_count(larger, "train", 2, 517)
    (line,) = verify_split(larger, read_manifest(larger), "train", "never").problems
    assert "train-000002.tar holds 500 samples" in line and "says 517" in line


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_are_replaced_by_their_substitute(digits_shards: Path, tmp_path: Path, backend: str) -> None:
    root, names = bad_test_split(digits_shards, tmp_path)
    healthy = [b for b in make_loader(DataConfig(root=str(digits_shards), backend=backend), MODEL, "test", 0, 1, 30,
                                      "cpu", 0).epoch(0)]
    model = ModelConfig(image_size=8, channels=1, y_condition=True, num_classes=10)
    scanned = verify_split(root, read_manifest(root), "test", "auto", num_classes=10)
    assert [f"{b.shard}:{b.key}" for b in scanned.bad] == names
    # The scan's list (the trainer's way), and none (webdataset: found while decoding; DALI: scans the split itself)
    for bad in (scanned.bad, None):
        loader = make_loader(DataConfig(root=str(root), backend=backend), model, "test", 0, 1, 30, "cpu", 0,
                             bad_samples=bad)
        batches = list(loader.epoch(0))
        assert len(batches) == len(healthy) == 6   # every batch whole: nothing dropped
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        want_images, want_labels = torch.cat([b[0] for b in healthy]), torch.cat([b[1] for b in healthy])
        for i in (3, 7, 95, 100):   # each replaced by the sample before it, pixels and label
            assert torch.equal(images[i], want_images[i - 1]) and labels[i] == want_labels[i - 1]
        others = [i for i in range(180) if i not in (3, 7, 95, 100)]
        assert torch.equal(images[others], want_images[others]) and torch.equal(labels[others], want_labels[others])
        found = [f"{b.shard}:{b.key}" for b in loader.take_bad_samples()]
        assert found == (names if bad is None and backend == "webdataset" else [])


def test_prepare_folder_skips_a_decompression_bomb(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    (src / "bomb.png").write_bytes(bomb_png())
    out = tmp_path / "out"
    assert cli(["prepare", "folder", "--src", str(src), "--out", str(out), "--size", "8", "--test-fraction", "0"]) == 0
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["num_samples"] == 3
    (skipped,) = manifest["skipped"]["items"]
    assert skipped["path"] == "bomb.png" and "declares 40000x40000" in skipped["error"]


# --- 2 ranks under glow-dist-horovodrun -----------------------------------------------------------------------------

def train_job(root: Path, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    """(exit status, everything printed) of a 2-rank debug training job on `root`."""
    launcher = BIN / "glow-dist-horovodrun"
    if not launcher.exists():
        pytest.skip("glow-dist-horovodrun is not installed: run `make horovod`")
    cmd = [str(launcher), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "glow_dist", "train",
           "--config", "configs/debug.yaml", *BASE, f"data.root={root}", f"train.run_dir={tmp_path / 'run'}",
           f"tracking.local_dir={tmp_path / 'mlflow'}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env_with_venv())
    return out.returncode, out.stdout + out.stderr


def the_run(uri: str, experiment: str):   # noqa: ANN201 - mlflow.entities.Run
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def damage(kind: str, root: Path) -> str:
    """Damage train-000001.tar (or its manifest entry) as `kind`; returns what the line must say."""
    shard = root / "train-000001.tar"
    if kind == "flipped":
        flip_in_place(root)
        return f"shard {shard} differs from manifest.json: sha256"
    if kind == "fewer-samples":
        rewrite_shard(root, "train", 1, lambda members: members[: 3 * 483], manifest_follows=False)
        return f"shard {shard} holds 483 samples"
    if kind == "manifest-larger":
        set_manifest_count(root, "train", 1, 517)
        return f"shard {shard} holds 500 samples (its index train-000001.idx), but {root / 'manifest.json'} says 517"
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 6 // 10])
        return f"shard {shard} is truncated"
    shard.unlink()
    return f"{shard} is listed in {root / 'manifest.json'} but missing"


@pytest.mark.parametrize("kind", ["flipped", "fewer-samples", "manifest-larger", "truncated", "deleted"])
def test_each_unusable_shard_kind_is_named_with_its_fix(digits_shards: Path, tmp_path: Path, kind: str) -> None:
    """The line each kind gets from the check the Trainer runs before any loader is built (verify_data: the job below
    prints it once and ends FAILED, whatever the kind)."""
    root = copy_of(digits_shards, tmp_path)
    says = damage(kind, root)
    (line,) = verify_split(root, read_manifest(root), "train", "auto").problems
    assert says in line and ("copy the shard" in line or "re-run `glow-dist prepare" in line), line


# Two ranks: a flipped shard on webdataset, and a truncated one (which DALI's reader would otherwise meet mid-read)
# on DALI. An unusable shard is found before any loader is built (verify_data in the Trainer), by code that the
# backend changes only under data.verify=never (the DALI header scan), and the job's path from the problem's line
# to the exit is the same for every kind (each kind's line: the test above).
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "backend"), [("flipped", "webdataset"), ("truncated", "dali")])
def test_an_unusable_shard_stops_the_job_with_one_line(digits_shards: Path, tmp_path: Path, mlflow_server: str,
                                                       kind: str, backend: str) -> None:
    root = copy_of(digits_shards, tmp_path)
    says = damage(kind, root)
    experiment = f"unusable-{kind}-{backend}"
    status, output = train_job(root, tmp_path, f"data.backend={backend}", f"tracking.uri={mlflow_server}",
                               f"tracking.experiment={experiment}")
    assert status == 2, output[-3000:]
    assert output.count(LINE) == 1, output[-3000:]   # once, by one rank
    (line,) = [ln for ln in output.splitlines() if LINE in ln]
    assert says in line and ("copy the shard" in line or "re-run `glow-dist prepare" in line), line
    assert "Traceback" not in output and "Segmentation" not in output, output[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()   # no rank trained
    _, run = the_run(mlflow_server, experiment)   # the failed start is a FAILED run with the reason, not nothing
    assert run.info.status == "FAILED" and run.data.tags["failure.reason"] == "bad-data", run.data.tags
    assert run.data.tags["failure.message"] == line.split(LINE, 1)[1].strip()


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "verify"), [("dali", "auto"), ("webdataset", "never")])
def test_bad_samples_are_replaced_counted_and_named_once(digits_shards: Path, tmp_path: Path, mlflow_server: str,
                                                         backend: str, verify: str) -> None:
    """DALI: found by the start-up scan; webdataset with data.verify=never: found while decoding, on both ranks."""
    root, names = bad_test_split(digits_shards, tmp_path)
    experiment = f"bad-samples-{backend}"
    status, output = train_job(root, tmp_path, f"data.backend={backend}", f"data.verify={verify}",
                               "model.y_condition=true", "model.num_classes=10", f"tracking.uri={mlflow_server}",
                               f"tracking.experiment={experiment}")
    assert status == 0, output[-3000:]
    for name in names:
        assert output.count(name) == 1, output[-3000:]   # named once, in the log of rank 0
    assert "replaced by a substitute" in output and "Traceback" not in output
    assert load_ckpt(tmp_path / "run", 6)["position"]["step"] == 6   # every step ran
    client, run = the_run(mlflow_server, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/bad_samples"] == 4
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "data/bad_samples.json", str(tmp_path)))
                       .read_text())
    keys = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [f"{k['shard']}:{k['key']}" for k in keys] == names and all(k["reason"] for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "verify"), [("dali", "auto"), ("webdataset", "never")])
def test_too_many_bad_samples_fail_the_run_with_one_line(digits_shards: Path, tmp_path: Path, mlflow_server: str,
                                                         backend: str, verify: str) -> None:
    root, names = bad_test_split(digits_shards, tmp_path)
    experiment = f"too-many-{backend}"
    status, output = train_job(root, tmp_path, f"data.backend={backend}", f"data.verify={verify}",
                               "data.max_bad_samples=2", "model.y_condition=true", "model.num_classes=10",
                               f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}")
    assert status == 2, output[-3000:]
    assert output.count(LINE) == 1 and "Traceback" not in output, output[-3000:]
    (line,) = [ln for ln in output.splitlines() if LINE in ln]
    assert "4 bad samples, more than data.max_bad_samples=2" in line and all(n in line for n in names), line
    _, run = the_run(mlflow_server, experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.reason"] == "bad-data"
    assert run.data.tags["failure.message"] == line.split(LINE, 1)[1].strip()


@pytest.mark.slow
def test_an_init_batch_larger_than_the_data_names_its_own_key(digits_shards: Path, tmp_path: Path) -> None:
    status, output = train_job(digits_shards, tmp_path, "train.init_batch_size=1000", "data.backend=webdataset")
    assert status == 2, output[-3000:]
    assert output.count(LINE) == 1, output[-3000:]
    assert "lower train.init_batch_size" in output and "lower train.batch_size" not in output


@pytest.mark.slow
def test_healthy_data_trains_bit_for_bit_as_without_any_check(digits_shards: Path, tmp_path: Path) -> None:
    finals = []
    for verify in ("always", "never"):
        status, output = train_job(digits_shards, tmp_path / verify, "data.backend=webdataset",
                                   f"data.verify={verify}", "train.deterministic=true")
        assert status == 0, output[-3000:]
        assert "bad sample" not in output
        finals.append(load_ckpt(tmp_path / verify / "run", 6))
    assert_identical(finals[0]["model"], finals[1]["model"])
    assert_identical(finals[0]["ema"], finals[1]["ema"])
