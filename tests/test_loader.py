"""`make_loader` on real shards with real DALI (CPU) and webdataset: same pixels, rank splits, resume, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glow_dist.cli import main
from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data import DataError, iter_samples, make_loader, read_manifest
from glow_dist.data.manifest import read_index

BACKENDS = ("dali", "webdataset")
MODEL = ModelConfig(image_size=8, channels=3)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """43 distinct 8x8 RGB images in 3 classes, 30/13 train/test, in shards of 7 so that parts cross shards."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(43):
        (src / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"c{i % 3}" / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("data") / "set"
    assert main(["prepare", "folder", "--src", str(src), "--out", str(out), "--size", "8", "--classes",
                 "--test-fraction", "0.3", "--shard-size", "7", "--workers", "1"]) == 0
    return out


def loader(root: Path, backend: str, split: str, rank: int = 0, world: int = 1, batch: int = 4, **cfg: object):
    data_cfg = DataConfig(root=str(root), backend=backend, num_workers=cfg.pop("workers", 1), **cfg)
    return make_loader(data_cfg, MODEL, split=split, rank=rank, world_size=world, batch_size=batch, device=CPU, seed=3)


def collect(ld, epoch: int = 0, start_batch: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    batches = list(ld.epoch(epoch, start_batch))
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 8) and labels.dtype == torch.int64
    return batches, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_backends_agree_on_test_split(dataset: Path, world: int) -> None:
    reference = [np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes() for img, _, _ in iter_samples(dataset, "test")]
    labels = [label for _, label, _ in iter_samples(dataset, "test")]
    got = {}
    for backend in BACKENDS:
        parts = [collect(loader(dataset, backend, "test", r, world, workers=2)) for r in range(world)]
        for r, (batches, images, _) in enumerate(parts):
            ld = loader(dataset, backend, "test", r, world)
            assert len(batches) == ld.batches_per_epoch and len(images) == ld.num_samples
        got[backend] = (sum((keys(p[1]) for p in parts), []), torch.cat([p[2] for p in parts]).tolist())
    # In order, every sample once across ranks, identical pixels and labels from both backends.
    assert got["dali"] == got["webdataset"] == (reference, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_ranks_disjoint_equal_batches(dataset: Path, backend: str) -> None:
    train = {img.transpose(2, 0, 1).tobytes() for img, _, _ in iter_samples(dataset, "train")}
    for epoch in (0, 1):
        loaders = [loader(dataset, backend, "train", r, 2, batch=4, workers=2) for r in range(2)]
        assert [ld.batches_per_epoch for ld in loaders] == [3, 3]  # 30 samples, 15 per rank, batches of 4
        seen = [keys(collect(ld, epoch)[1]) for ld in loaders]
        assert [len(s) for s in seen] == [12, 12]
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) <= train
        assert len(set(seen[0])) == 12  # no sample twice within an epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_order_is_a_function_of_seed_and_epoch(dataset: Path, backend: str) -> None:
    ld = loader(dataset, backend, "train", 0, 1, batch=4, flip=True, workers=2)
    _, epoch0, labels0 = collect(ld, 0)
    _, again, labels_again = collect(loader(dataset, backend, "train", 0, 1, batch=4, flip=True, workers=2), 0)
    assert torch.equal(epoch0, again) and torch.equal(labels0, labels_again)
    _, resumed, _ = collect(ld, 0, start_batch=2)
    assert torch.equal(resumed, epoch0[8:])
    _, epoch1, _ = collect(ld, 1)
    assert not torch.equal(epoch0, epoch1)
    # Flipping is random per sample: some images come out mirrored, all of them are stored images or mirrors.
    stored = {img.transpose(2, 0, 1).tobytes() for img, _, _ in iter_samples(dataset, "train")}
    mirrored = [image.numpy().tobytes() not in stored for image in epoch0]
    assert 0 < sum(mirrored) < len(mirrored)
    assert all(image.flip(-1).numpy().tobytes() in stored for image, m in zip(epoch0, mirrored, strict=True) if m)


def corrupt_copy(dataset: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy whose test sample 5 has garbage PNG bytes of the same length (the index stays valid)."""
    root = tmp_path / "bad"
    shutil.copytree(dataset, root)
    shard = read_manifest(root)["splits"]["test"]["shards"][0]
    offset, size = read_index(root / shard["index"])[5]["png"]
    with open(root / shard["file"], "r+b") as f:
        f.seek(offset)
        f.write((b"\x89PNG garbage!" * size)[:size])
    return root, shard["file"], "0000005"


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_image_is_replaced_and_named(dataset: Path, tmp_path: Path, backend: str) -> None:
    root, shard, key = corrupt_copy(dataset, tmp_path)
    assert_replaced(loader(root, backend, "test", batch=4), loader(dataset, backend, "test", batch=4), shard, key, 4)


def assert_replaced(damaged, healthy, shard: str, key: str, substitute: int) -> None:
    """The damaged loader yields the healthy one's batches, with sample `key` replaced by sample `substitute` (the
    nearest good one of its shard), and names it: the webdataset backend while decoding, DALI by its scan."""
    _, images, labels = collect(damaged)
    _, want, want_labels = collect(healthy)
    i = int(key)
    assert torch.equal(images[i], want[substitute]) and labels[i] == want_labels[substitute]
    others = [j for j in range(len(want)) if j != i]
    assert torch.equal(images[others], want[others]) and torch.equal(labels[others], want_labels[others])
    named = damaged.bad_samples + damaged.take_bad_samples()
    assert [(b.shard, b.key) for b in named] == [(shard, key)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard(dataset: Path, tmp_path: Path, backend: str) -> None:
    root = tmp_path / "cut"
    shutil.copytree(dataset, root)
    shard = root / read_manifest(root)["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match=rf"{shard.name} is truncated"):
        loader(root, backend, "train")


def test_missing_empty_and_mismatched(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*glow-dist prepare"):
        loader(tmp_path / "nowhere", "webdataset", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared data set.*holds no shards"):
        loader(tmp_path / "empty", "dali", "train")
    cfg = DataConfig(root=str(dataset), backend="webdataset")
    with pytest.raises(DataError, match=r"8x8 images with 3 .*model.image_size=16.*--size 16"):
        make_loader(cfg, ModelConfig(image_size=16, channels=3), "train", 0, 1, 4, CPU, 0)
    with pytest.raises(DataError, match="fewer than world size 4 x batch size 16"):
        make_loader(cfg, MODEL, "train", 0, 4, 16, CPU, 0)


def wrong_size_copy(dataset: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy whose first test image is re-encoded at 16x16 inside an 8x8 data set (shards made by another tool)."""
    import io
    import tarfile

    from glow_dist.data.shards import write_index

    root = tmp_path / "wrong-size"
    shutil.copytree(dataset, root)
    shard = read_manifest(root)["splits"]["test"]["shards"][0]
    with tarfile.open(root / shard["file"]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".png"))
    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png, format="PNG")
    members[index][0].size = len(png.getvalue())
    members[index] = (members[index][0], png.getvalue())
    with tarfile.open(root / shard["file"], "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    write_index(root / shard["file"], root / shard["index"])
    return root, shard["file"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_size_image_inside_a_shard_is_replaced(dataset: Path, tmp_path: Path, backend: str) -> None:
    root, shard = wrong_size_copy(dataset, tmp_path)
    assert_replaced(loader(root, backend, "test", batch=4), loader(dataset, backend, "test", batch=4), shard,
                    "0000000", 1)


def test_process_with_an_abandoned_webdataset_loader_exits(dataset: Path) -> None:
    """Workers ignore SIGTERM (see wds_loader), which multiprocessing uses to end them at exit: a process that leaves
    a loader open (an exception mid-epoch keeps its iterator alive) must still exit, not wait on them for ever."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from glow_dist.config import DataConfig, ModelConfig\n"
        "from glow_dist.data import make_loader\n"
        f"cfg = DataConfig(root={str(dataset)!r}, backend='webdataset', num_workers=2)\n"
        "ld = make_loader(cfg, ModelConfig(image_size=8, channels=3), split='train', rank=0, world_size=1,\n"
        "                 batch_size=2, device=torch.device('cpu'), seed=0)\n"
        "it = iter(ld.epoch(0))\n"
        "next(it)\n"
        "sys.stdout.write('read one batch\\n'); sys.stdout.flush()\n"
        "raise SystemExit(3)  # `it` is still referenced: its workers are alive at exit\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("the process hung at exit waiting for its loader workers") from e
    assert "read one batch" in out.stdout, out.stderr[-2000:]
    assert out.returncode == 3 and "Exception ignored" not in out.stderr, out.stderr[-2000:]


# ---- the shared types module, the decode choice and the n-bit quantization (issue 14) ----------------------------

def test_backends_depend_on_the_shared_types_only() -> None:
    """Importing a backend loads glow_dist.data.base, never the factory: no import cycle."""
    import subprocess
    import sys

    code = ("import sys, glow_dist.data.dali_loader, glow_dist.data.wds_loader; "
            "print('glow_dist.data.loader' in sys.modules, 'glow_dist.data.base' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_decode_choice(dataset: Path) -> None:
    from glow_dist.data.loader import resolve_decode

    cuda = torch.device("cuda", 0)
    assert resolve_decode("auto", "dali", CPU) == "cpu" and resolve_decode("auto", "dali", cuda) == "gpu"
    assert resolve_decode("auto", "webdataset", cuda) == "cpu" and resolve_decode("cpu", "dali", cuda) == "cpu"
    assert resolve_decode("gpu", "dali", cuda) == "gpu"
    with pytest.raises(DataError, match="needs the DALI backend"):
        resolve_decode("gpu", "webdataset", cuda)
    from glow_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'data.decode' must be one of auto, cpu, gpu"):
        load_config(None, ["data.decode=nvjpeg"])
    # On this CPU rank: asking for GPU decoding is an error naming the device, auto decodes on the CPU.
    with pytest.raises(DataError, match=r"data.decode=gpu but this rank's device is cpu"):
        loader(dataset, "dali", "test", decode="gpu")
    for backend in BACKENDS:
        ld = loader(dataset, backend, "test")
        assert ld.backend == backend and ld.decode == "cpu"
        assert ld.describe() == f"data: {backend} backend, decoding on the CPU (device cpu)"


@pytest.mark.parametrize("n_bits", [3, 5])
def test_loaders_quantize_to_n_bits(dataset: Path, n_bits: int) -> None:
    """Both backends hand out the top n_bits of each value (DALI in its pipeline, on the GPU when it decodes there)."""
    from glow_dist.model import preprocess

    mask = (0xFF << (8 - n_bits)) & 0xFF
    full = torch.cat([b[0] for b in loader(dataset, "webdataset", "test").epoch(0)])
    assert (full & ~mask & 0xFF).any()  # the data set has low bits to drop
    for backend in BACKENDS:
        model = ModelConfig(image_size=8, channels=3, n_bits=n_bits)
        ld = make_loader(DataConfig(root=str(dataset), backend=backend), model, split="test", rank=0, world_size=1,
                         batch_size=4, device=CPU, seed=3)
        got = torch.cat([b[0] for b in ld.epoch(0)])
        assert torch.equal(got, full & mask), backend
        # The model's own quantization gives the same bins from the loader's images as from the full ones.
        assert torch.equal(preprocess(got, n_bits, noise=False), preprocess(full, n_bits, noise=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_says_which_backend_and_decoder_ran(digits_shards: Path, tmp_path: Path, backend: str) -> None:
    import subprocess
    import sys

    from helpers import REPO, env_with_venv

    cmd = [sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", "train.steps=2",
           "train.progress=false", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
           "train.max_eval_batches=1", "train.threads=1", f"data.root={digits_shards}", f"data.backend={backend}",
           f"train.run_dir={tmp_path / 'run'}", f"tracking.local_dir={tmp_path / 'mlflow'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=env_with_venv({"MLFLOW_TRACKING_URI": ""}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"data: {backend} backend, decoding on the CPU (device cpu)" in out.stderr
