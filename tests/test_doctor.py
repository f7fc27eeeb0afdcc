"""`glow-dist doctor` for real: a real MLflow server, a dead one, real shards, a broken data dir, horovodrun -np 2."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, env_with_venv, horovodrun_cmd
from test_tracking import _free_port

import glow_dist.preflight.doctor as doctor
from glow_dist.config import Config


def run_doctor(*args: str, np: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "glow_dist", "doctor", *args]
    if np > 1:
        cmd = horovodrun_cmd(np, *cmd[1:])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=env_with_venv({"MLFLOW_TRACKING_URI": "", **(env or {})}))


def lines(out: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail) from doctor's output (one rank)."""
    found = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(?:.*?\] )?(PASS|FAIL|SKIP)  (\S+)\s+(.*)$", line)
        if m:
            found[m.group(2)] = (m.group(1), m.group(3))
    return found


def test_doctor_passes_with_a_live_tracking_server(mlflow_server: str, digits_shards: Path) -> None:
    out = run_doctor("--data", str(digits_shards), f"tracking.uri={mlflow_server}")
    got = lines(out)
    assert out.returncode == 0, out.stdout + out.stderr
    assert got["torch"][0] == "PASS" and got["webdataset"][0] == "PASS"
    assert got["mlflow"] == ("PASS", got["mlflow"][1]) and mlflow_server in got["mlflow"][1]
    assert got["data"][0] == "PASS" and "8x8x1" in got["data"][1]
    assert got["data:train"][0] == got["data:test"][0] == "PASS"
    # This machine: no GPU. DALI (installed by `make install`) must really decode on the CPU.
    assert got["gpus"][0] == "SKIP" and got["allreduce"][0] == "SKIP"
    assert got["gpus"][1].startswith("no CUDA device: this torch is a CPU-only build. So: training runs on the CPU")
    assert got["dali"][0] == "PASS" and "on the CPU (cpu)" in got["dali"][1]


def test_no_gpu_is_explained() -> None:
    # A CUDA torch on a machine without the driver (what `make wheelhouse-check` meets on a CPU node) says so.
    no_driver = doctor.no_gpu_reason("13.0", None, None)
    assert "this torch is a CUDA 13.0 build but there is no NVIDIA driver (no libcuda.so.1)" in no_driver
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in doctor.no_gpu_reason("12.8", "libcuda.so.1", "")
    assert "driver loads, but it reports no usable GPU" in doctor.no_gpu_reason("12.8", "libcuda.so.1", "0,1")
    for reason in (doctor.no_gpu_reason(None, None, None), doctor.no_gpu_reason("13.0", None, "0")):
        assert reason.endswith("Horovod all-reduces over Gloo; NCCL, DALI's GPU decode and the CUDA step modes are "
                               "not exercised here")


def test_unreachable_tracking_server_fails_clearly() -> None:
    port = _free_port()  # nothing listens there
    out = run_doctor(f"tracking.uri=http://127.0.0.1:{port}", "--timeout", "2")
    status, detail = lines(out)["mlflow"]
    assert out.returncode == 1
    assert status == "FAIL" and f"http://127.0.0.1:{port} unreachable" in detail
    assert "1 failure(s)" in out.stderr


def test_broken_data_dir_fails(digits_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(digits_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    first_test = manifest["splits"]["test"]["shards"][0]["file"]
    (root / first_test).write_bytes(b"not a tar file")  # same name, wrong size and content
    out = run_doctor("--data", str(root))
    got = lines(out)
    assert out.returncode == 1
    assert got["data"][0] == "PASS" and got["data:train"][0] == "PASS"
    assert got["data:test"][0] == "FAIL" and first_test in got["data:test"][1]

    missing = run_doctor("--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and lines(missing)["data"][0] == "FAIL"
    assert "does not exist" in lines(missing)["data"][1]


def test_shape_mismatch_with_the_config_fails(digits_shards: Path) -> None:
    out = run_doctor("--config", "configs/debug.yaml", "--data", str(digits_shards), "model.image_size=16")
    status, detail = lines(out)["data"]
    assert out.returncode == 1 and status == "FAIL" and "model.image_size" in detail


@pytest.mark.slow
def test_every_rank_checks_and_allreduces_under_horovodrun(mlflow_server: str, digits_shards: Path) -> None:
    out = run_doctor("--data", str(digits_shards), f"tracking.uri={mlflow_server}", np=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    per_rank = {r: [ln for ln in out.stdout.splitlines() if f"[rank {r}/2 " in ln] for r in (0, 1)}
    for r, rank_lines in per_rank.items():
        allreduce = [ln for ln in rank_lines if "allreduce" in ln]
        assert len(allreduce) == 1 and "PASS" in allreduce[0], rank_lines
        assert f"rank {r}/2 on cpu (Gloo): sum 3, expected 3" in allreduce[0]
        assert any("PASS  horovod" in ln and "Gloo+" in ln for ln in rank_lines)
        assert any("PASS  mlflow" in ln for ln in rank_lines)
    assert "doctor: 2 ranks checked, 0 failure(s)" in out.stdout


@pytest.mark.slow
def test_a_failure_on_any_rank_fails_every_rank() -> None:
    out = run_doctor(f"tracking.uri=http://127.0.0.1:{_free_port()}", "--timeout", "2", np=2)
    assert out.returncode != 0
    assert "doctor: 2 ranks checked, 2 failure(s)" in out.stdout


def test_tracking_uri_follows_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = Config()
    cfg.tracking.local_dir = str(tmp_path / "store")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert doctor.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert doctor.check_mlflow(cfg, 1.0).status == "PASS"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert doctor.tracking_uri(cfg) == "http://127.0.0.1:1"
    cfg.tracking.uri = "http://127.0.0.1:2"
    assert doctor.tracking_uri(cfg) == "http://127.0.0.1:2"
