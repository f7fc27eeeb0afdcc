"""Shared fixtures: real digits shards written by `glow-dist prepare`, one real MLflow server per session, a real
S3-compatible object store (tests/object_store.py), and a small tmpfs that fills up."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import mounted_tmpfs
from object_store import s3_store  # noqa: F401 - the session's SeaweedFS, for the s3-marked tests

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is present (pytest -m gpu on a GPU machine runs just them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the keyword: a folder named gpu is one
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def verify_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shard verification cache (glow_dist/data/verify.py) of this session's processes, children included: not
    the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scikit-learn digits as 8x8 grey WebDataset shards with DALI index files (prepared once per session)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    cmd = [sys.executable, "-m", "glow_dist", "prepare", "digits", "--out", str(out), "--shard-size", "500"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def unbroken_run(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> Callable[..., Path]:
    """`unbroken_run(*overrides, np=1)`: the run directory of `glow-dist train` with these overrides on the digits
    shards, trained once per session for each (np, overrides) and shared by the tests that ask for the same one: the
    unbroken run a resumed one must match, or any trained run a test reads. Copy it (`copy_run`) before running
    anything that writes in it."""
    from helpers import train_cli

    runs: dict[tuple, Path] = {}

    def run(*overrides: str, np: int = 1) -> Path:
        key = (np, overrides)
        if key not in runs:
            folder = tmp_path_factory.mktemp("unbroken")
            train_cli(*overrides, f"data.root={digits_shards}", f"train.run_dir={folder / 'run'}",
                      f"tracking.local_dir={folder / 'mlflow'}", np=np)
            runs[key] = folder / "run"
        return runs[key]

    return run


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of an `mlflow server` on a free 127.0.0.1 port, with a sqlite backend."""
    from test_tracking import Server

    server = Server(tmp_path_factory.mktemp("mlflow_server_session")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs mounted for the test (root only): a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    with mounted_tmpfs(mount, "4m"):
        yield mount
