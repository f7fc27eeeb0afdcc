"""The install paths of the GPU stack that can be checked quickly on a CPU machine: what `make install WHEELHOUSE=`
and `make wheelhouse` run, which torch build and DALI each CUDA flavour takes (from the torch wheels' real metadata,
with stand-in wheels of a few kB), and the refusals of the Horovod and wheelhouse scripts. Building a real CUDA
wheelhouse (3-5 GB) and its offline install are `make wheelhouse` and `make wheelhouse-check`, not in the suite;
docs/install.md (Air-gapped clusters) gives the commands and what they measured."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def make_n(*args: str) -> list[list[str]]:
    out = run("make", "-n", "--no-print-directory", *args)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.replace("\\\n", " ").splitlines() if line.strip()]


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


def test_make_wheelhouse_passes_flavour_python_torch_and_index() -> None:
    # The flavour's own torch unless asked (cu12 and cu13 take different versions: not the CPU venv's TORCH_VERSION).
    assert make_n("wheelhouse", "CUDA=cu12", "PYTHON=python3.12") == [
        ["bash", "launch/wheelhouse.sh", "wheelhouse/cu12", "cu12", "python3.12"]]
    assert make_n("wheelhouse", "CUDA=cu13", "WHEELHOUSE=/srv/wh")[0][2:4] == ["/srv/wh", "cu13"]
    assert make_n("wheelhouse", "CUDA=cu12", "WHEELHOUSE_TORCH=2.14.1", "TORCH_INDEX=https://example.org/cu128") == [
        ["TORCH_INDEX=https://example.org/cu128", "bash", "launch/wheelhouse.sh", "wheelhouse/cu12", "cu12",
         "python3", "2.14.1"]]
    assert make_n("wheelhouse-check", "WHEELHOUSE=/srv/wh") == [["bash", "launch/wheelhouse-check.sh", "/srv/wh"]]


def test_scripts_refuse_what_they_cannot_build(tmp_path: Path) -> None:
    out = run("bash", "launch/wheelhouse.sh", str(tmp_path / "w"), "cu11")
    assert out.returncode == 1 and "FLAVOUR must be cpu, cu12 or cu13, got 'cu11'" in out.stderr
    # This venv's torch is the CPU build: an NCCL build must be refused before anything is downloaded.
    out = run("bash", "launch/install-horovod.sh", str(BIN / "python"), env={"GLOW_DIST_HOROVOD_GPU": "nccl"})
    assert out.returncode == 1 and "an NCCL build needs a CUDA build of torch" in out.stderr
    out = run("bash", "launch/install-horovod.sh", str(BIN / "python"), env={"GLOW_DIST_HOROVOD_GPU": "rocm"})
    assert out.returncode == 1 and "must be auto, nccl or cpu, got 'rocm'" in out.stderr


# The metadata lines that tell the builds apart, copied from the real wheels: PyTorch's CPU index (2.13.0+cpu), PyPI's
# 2.10.0 (the last PyPI torch for CUDA 12.8) and 2.14.1 (CUDA 13.0), and PyTorch's cu128 index (local version only).
TORCH_METADATA = {
    "2.13.0+cpu": ["filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2",
                   "fsspec>=0.8.5", 'optree>=0.13.0; extra == "optree"'],
    "2.10.0": ["filelock", 'cuda-bindings==12.9.4; platform_system == "Linux" and platform_machine == "x86_64"',
               'nvidia-cuda-nvrtc-cu12==12.8.93; platform_system == "Linux" and platform_machine == "x86_64"',
               'nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux" and platform_machine == "x86_64"',
               'nvidia-nccl-cu12==2.27.5; platform_system == "Linux" and platform_machine == "x86_64"',
               'triton==3.6.0; platform_system == "Linux" and platform_machine == "x86_64"'],
    "2.14.1": ["filelock", 'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,'
                           'nvtx]==13.0.3; platform_system == "Linux"',
               'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
               'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"',
               'nvidia-nccl-cu13==2.30.7; platform_system == "Linux"', 'triton~=3.8.0; platform_system == "Linux"'],
    "2.14.1+cu128": ["filelock", "jinja2"],
}


def fake_torch(folder: Path, version: str) -> Path:
    """A stand-in torch wheel: no code, the real wheel's version and requirements (pip reads only these)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: torch\nVersion: {}\n{}".format(
        version, "".join(f"Requires-Dist: {d}\n" for d in TORCH_METADATA[version]))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"torch-{version}.dist-info/METADATA", meta)
        z.writestr(f"torch-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"torch-{version}.dist-info/RECORD", "")
    return path


@pytest.mark.parametrize(("version", "flavour"), [("2.13.0+cpu", "cpu"), ("2.10.0", "cu12"), ("2.14.1", "cu13"),
                                                  ("2.14.1+cu128", "cu12")])
def test_torch_flavour_from_the_wheel_metadata(tmp_path: Path, version: str, flavour: str) -> None:
    out = run(sys.executable, "launch/torch_flavour.py", str(fake_torch(tmp_path, version)))
    assert out.returncode == 0 and out.stdout.strip() == flavour, out.stderr


def offline_env(links: Path) -> dict:
    """pip sees only `links`: no configuration files, no index, so nothing is downloaded."""
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "TORCH_INDEX": "",
            "PIP_EXTRA_INDEX_URL": "", "PIP_CONSTRAINT": ""}


@pytest.mark.parametrize(("flavour", "torch", "dali"), [("cpu", "2.13.0+cpu", "nvidia-dali-cuda120"),
                                                        ("cu12", "2.10.0", "nvidia-dali-cuda120"),
                                                        ("cu13", "2.14.1", "nvidia-dali-cuda130")])
def test_wheelhouse_takes_each_flavours_torch_and_dali(tmp_path: Path, flavour: str, torch: str, dali: str) -> None:
    """Each flavour's default torch, found through pip among builds of every flavour, is checked as that flavour
    before anything else is fetched. The stand-in wheels end the run at the next download (there is no index)."""
    links = tmp_path / "links"
    for version in ("2.13.0+cpu", "2.10.0", "2.14.1"):  # (with 2.14.1+cu128 there, torch==2.14.1 would take it)
        fake_torch(links, version)
    out = run("bash", "launch/wheelhouse.sh", str(tmp_path / "house"), flavour, sys.executable,
              env=offline_env(links))
    assert f"wheelhouse: {flavour} into {tmp_path / 'house'}: torch {torch.split('+')[0]} from the configured " \
           f"indexes (PyPI), {dali}" in out.stdout, out.stdout + out.stderr
    assert f"wheelhouse: torch-{torch}-py3-none-any.whl is a {flavour} build" in out.stdout, out.stdout + out.stderr
    assert out.returncode != 0 and not (tmp_path / "house.build-venv").exists()  # no index: stops at pip's wheels
    if flavour == "cu12" and not cuda12_toolkit():  # this VM: CUDA 13.0 only; stopped before the downloads
        assert "wheelhouse: cu12 needs a CUDA 12 toolkit to build Horovod with NCCL" in out.stderr, out.stderr


def cuda12_toolkit() -> bool:
    homes = [os.environ.get("HOROVOD_CUDA_HOME"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvccs = [shutil.which("nvcc")] + [f"{h}/bin/nvcc" for h in homes if h]
    for nvcc in filter(None, nvccs):
        try:
            if "release 12." in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout:
                return True
        except OSError:
            continue
    return False


def test_wheelhouse_refuses_a_torch_of_another_flavour(tmp_path: Path) -> None:
    links = tmp_path / "links"
    fake_torch(links, "2.14.1")  # PyPI's 2.14.1 is CUDA 13: asked for as cu12 it must be refused, before any download
    out = run("bash", "launch/wheelhouse.sh", str(tmp_path / "house"), "cu12", sys.executable, "2.14.1",
              env=offline_env(links))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "torch-2.14.1-py3-none-any.whl is a cu13 build, not cu12; choose its source with TORCH_INDEX=" in out.stderr
    assert sorted(p.name for p in (tmp_path / "house").iterdir()) == ["torch-2.14.1-py3-none-any.whl"]
