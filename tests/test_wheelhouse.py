"""The install paths of the GPU stack that can be checked quickly on a CPU machine: what `make install WHEELHOUSE=`
and `make wheelhouse` run, and the refusals of the Horovod and wheelhouse scripts. The full offline install (a CPU
wheelhouse into a fresh venv with no index and a dead proxy) and the NCCL build are too long for the suite; README
(Install) gives the commands."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def make_n(*args: str) -> list[list[str]]:
    out = run("make", "-n", "--no-print-directory", *args)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def test_install_from_a_wheelhouse_never_asks_an_index(tmp_path: Path) -> None:
    house, venv = tmp_path / "house", tmp_path / "venv"
    commands = make_n("install", f"WHEELHOUSE={house}", f"VENV={venv}")
    pips = [c for c in commands if c[1:4] == ["-m", "pip", "install"]]
    assert len(pips) == 3, commands  # pip/setuptools/wheel, the flavour's requirements, the project
    for c in pips:
        i = c.index("--no-index")
        assert c[i + 1:i + 3] == ["--find-links", str(house)], c
    assert ["-r", f"{house}/requirements.txt"] == pips[1][-2:]
    assert pips[2][-2:] == ["-e", ".[test]"]  # DALI comes from requirements.txt: the flavour's build
    online = make_n("install", f"VENV={venv}")
    assert not any("--no-index" in c for c in online) and any(c[-1] == ".[dali,test]" for c in online)


def test_make_wheelhouse_passes_flavour_python_and_torch() -> None:
    assert make_n("wheelhouse", "CUDA=cu12", "PYTHON=python3.12") == [
        ["bash", "launch/wheelhouse.sh", "wheelhouse/cu12", "cu12", "python3.12", "2.13.0"]]
    assert make_n("wheelhouse", "CUDA=cu13", "WHEELHOUSE=/srv/wh")[0][2:4] == ["/srv/wh", "cu13"]


def test_scripts_refuse_what_they_cannot_build(tmp_path: Path) -> None:
    out = run("bash", "launch/wheelhouse.sh", str(tmp_path / "w"), "cu11")
    assert out.returncode == 1 and "FLAVOUR must be cpu, cu12 or cu13, got 'cu11'" in out.stderr
    # This venv's torch is the CPU build: an NCCL build must be refused before anything is downloaded.
    out = run("bash", "launch/install-horovod.sh", str(BIN / "python"), env={"GLOW_DIST_HOROVOD_GPU": "nccl"})
    assert out.returncode == 1 and "an NCCL build needs a CUDA build of torch" in out.stderr
    out = run("bash", "launch/install-horovod.sh", str(BIN / "python"), env={"GLOW_DIST_HOROVOD_GPU": "rocm"})
    assert out.returncode == 1 and "must be auto, nccl or cpu, got 'rocm'" in out.stderr
