"""The GPU stack on a CUDA machine: NCCL all-reduce through Horovod, DALI's mixed (GPU) decode against its CPU
decode, and a short training run decoding on the GPU through the real loaders. Skipped without a CUDA device."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BASE, REPO, env_with_venv, horovodrun_cmd

from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data import make_loader

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

JPEG_MEAN_BOUND, JPEG_MAX_BOUND = 1.0, 8  # |nvJPEG - libjpeg-turbo| on smooth q95 images: IDCT rounding only


def test_nccl_allreduce_through_horovod() -> None:
    np_ = min(2, torch.cuda.device_count())
    out = subprocess.run(horovodrun_cmd(np_, "-m", "glow_dist", "doctor"), capture_output=True, text=True,
                         cwd=REPO, timeout=300, env=env_with_venv({"MLFLOW_TRACKING_URI": ""}))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    want = np_ * (np_ + 1) / 2
    for r in range(np_):
        line = next(ln for ln in out.stdout.splitlines() if f"[rank {r}/{np_} " in ln and "allreduce" in ln)
        assert f"PASS  allreduce   rank {r}/{np_} on cuda:{r} (NCCL): sum {want:g}" in line
    assert "NCCL+" in out.stdout


def _images(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    smooth = [np.stack([x, y, (x + y) / 2], -1) * 255 for _ in range(count // 2)]
    noisy = [rng.integers(0, 256, (size, size, 3)) for _ in range(count - count // 2)]
    return [a.astype(np.uint8) for a in smooth + noisy]


def _encode(images: list[np.ndarray], fmt: str) -> list[bytes]:
    from PIL import Image

    blobs = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        blobs.append(buf.getvalue())
    return blobs


def test_dali_mixed_decode_matches_cpu_decode() -> None:
    from glow_dist.preflight.doctor import dali_decode

    images = _images(8, 64)
    png = _encode(images, "PNG")
    gpu, cpu = dali_decode(png, "mixed", 0), dali_decode(png, "cpu", None)
    assert np.array_equal(gpu, cpu) and np.array_equal(cpu, np.stack(images))  # lossless: bit-identical
    jpeg = _encode(images[:4], "JPEG")  # the smooth ones: a JPEG a data set would hold
    gpu, cpu = dali_decode(jpeg, "mixed", 0), dali_decode(jpeg, "cpu", None)
    diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
    print(f"JPEG mixed vs cpu: mean |diff| {diff.mean():.4f}, max {diff.max()}, "
          f"{(diff > 0).mean():.2%} of values differ")
    assert diff.mean() <= JPEG_MEAN_BOUND and diff.max() <= JPEG_MAX_BOUND


def test_gpu_loader_gives_the_cpu_loaders_batches_on_the_device(tmp_path: Path) -> None:
    """Train split with flips and 5-bit quantization: the GPU pipeline's batches are the CPU pipeline's, on cuda:0."""
    from PIL import Image

    from glow_dist.cli import main

    src = tmp_path / "src" / "c0"
    src.mkdir(parents=True)
    for i, a in enumerate(_images(24, 16)):
        Image.fromarray(a).save(src / f"{i:03d}.png")
    root = tmp_path / "set"
    assert main(["prepare", "folder", "--src", str(src.parent), "--out", str(root), "--size", "16",
                 "--test-fraction", "0.25", "--shard-size", "7", "--workers", "1"]) == 0
    model = ModelConfig(image_size=16, channels=3, n_bits=5)
    batches = {}
    for decode in ("gpu", "cpu"):
        cfg = DataConfig(root=str(root), backend="dali", decode=decode, flip=True)
        ld = make_loader(cfg, model, "train", rank=0, world_size=1, batch_size=4, device="cuda:0", seed=1)
        assert ld.decode == decode and "decoding on the " + decode.upper() in ld.describe()
        batches[decode] = list(ld.epoch(0))
    for (g, gl), (c, cl) in zip(batches["gpu"], batches["cpu"], strict=True):
        assert g.is_cuda and g.device.index == 0 and g.dtype == torch.uint8 and g.shape[1:] == (3, 16, 16)
        assert torch.equal(g, c) and torch.equal(gl, cl)
        assert not (g & 0x07).any()  # quantized to 5 bits


def test_short_training_run_decodes_captures_and_records_its_modes_on_the_gpu(tmp_path: Path,
                                                                             digits_shards: Path) -> None:
    """The defaults on a GPU: DALI decodes there, and the step and the sample grids run as CUDA graphs (auto), which
    the log and the run's MLflow tags say; a silent fallback to eager would fail here."""
    overrides = BASE + [f"data.root={digits_shards}", "data.backend=dali", "data.decode=auto",
                        f"train.run_dir={tmp_path / 'run'}", f"tracking.local_dir={tmp_path / 'mlflow'}"]
    out = subprocess.run([sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", *overrides],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=env_with_venv({"MLFLOW_TRACKING_URI": ""}))
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "data: dali backend, decoding on the GPU (device cuda:0)" in out.stderr
    assert list((tmp_path / "run").glob("**/*.pt")), "no checkpoint written"
    assert "[step] graphed: forward + backward captured for batch (8, " in log, log[-4000:]
    assert "[decode] graphed: sample captured for batch" in log, log[-4000:]
    assert "running eager" not in log, log[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["runtime.step_mode"] == "graphed" and run.data.tags["runtime.sample_mode"] == "graphed"
    assert run.data.tags["runtime.memory"] == "plain"


def test_graphed_step_on_two_gpus_with_nccl_equals_eager_with_and_without_fp16_allreduce(tmp_path: Path) -> None:
    """Two ranks, one GPU each, real NCCL all-reduces (tests/scripts/gpu_step_check.py): both ranks capture, the
    graphed step takes the eager step's steps (fp32, deterministic cuDNN), with and without fp16 compression (issue
    25, finding 1: a decompressing all-reduce must not leave the optimizer an old gradient), and the ranks agree."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs, this machine has {torch.cuda.device_count()}")
    out = subprocess.run(horovodrun_cmd(2, str(REPO / "tests/scripts/gpu_step_check.py"), str(tmp_path)),
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env_with_venv())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for fp16 in (False, True):
        eager, graphed = f"eager-fp16={fp16}", f"graphed-fp16={fp16}"
        for dump in ranks:
            assert dump[graphed]["mode"] == "graphed" and dump[graphed]["tags"] == {"runtime.step_mode": "graphed"}
            assert any("captured" in line for line in dump[graphed]["logs"]), dump[graphed]["logs"]
            for (a, b) in zip(dump[eager]["bpds"], dump[graphed]["bpds"], strict=True):
                assert a == pytest.approx(b, rel=1e-5)
            for name, value in dump[eager]["model"].items():
                torch.testing.assert_close(dump[graphed]["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        for name, value in ranks[0][graphed]["model"].items():
            assert torch.equal(value, ranks[1][graphed]["model"][name]), (graphed, name)
