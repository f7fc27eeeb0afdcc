"""`glow-dist prepare`: each source, manifests, DALI index files, overwrite protection, unreadable images."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glow_dist.cli import main
from glow_dist.data import iter_samples, read_manifest

WDS2IDX = Path(sys.executable).parent / "wds2idx"  # shipped with nvidia-dali


def prepare(*args: str | Path) -> int:
    return main(["prepare", *map(str, args)])


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient plus noise: realistic enough to decode, unique per call."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) * (x[..., None] / w) + rng.uniform(0, 255, 3) * (y[..., None] / h)
    return np.clip(base / 2 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def make_folder(root: Path, n_per_class: int = 5, corrupt: bool = True) -> Path:
    """cats/ and dogs/ with PNGs and JPEGs of odd sizes, one garbage .png, and a CelebA-style attribute file."""
    rng = np.random.default_rng(0)
    names = []
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            name = f"{cls}_{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(smooth_image(rng, 12 + i, 10)).save(root / cls / name)
            names.append(name)
    if corrupt:
        (root / "dogs" / "broken.png").write_bytes(b"\x89PNG this is not an image")
        names.append("broken.png")
    rows = [f"{name} {' '.join(['1', '-1'] if k % 2 else ['-1', '1'])}" for k, name in enumerate(names)]
    (root / "attrs.txt").write_text(f"{len(names)}\nSmiling Young\n" + "\n".join(rows) + "\n")
    return root


def make_cifar(path: Path, per_batch: int = 4, n_test: int = 3, plant: dict[str, object] | None = None
               ) -> dict[str, np.ndarray]:
    """A tiny archive in the cifar-10-python.tar.gz layout (`plant`: an object added to some batches); returns the
    pixel rows written."""
    plant = plant or {}
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    rows = {}
    with tarfile.open(path, "w:gz") as tf:
        for name, n in batches.items():
            rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            content = {b"data": rows[name], b"labels": [int(v) for v in rng.integers(0, 10, n)],
                       b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
            if name in plant:
                content[b"notes"] = plant[name]
            add_bytes(tf, f"cifar-10-batches-py/{name}", numpy1_pickle(content))
        names = "airplane automobile bird cat deer dog frog horse ship truck".split()
        meta = {b"label_names": [c.encode() for c in names]}
        add_bytes(tf, "cifar-10-batches-py/batches.meta", pickle.dumps(meta))
    return rows


def numpy1_pickle(obj: object) -> bytes:
    """A protocol-2 pickle naming numpy 1's module (numpy.core), as the real archive's batches do."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def check_shards(root: Path) -> dict:
    """Manifest counts, sha256 and index files agree with the files on disk (index == what wds2idx writes)."""
    manifest = read_manifest(root)
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        assert sum(s["num_samples"] for s in entry["shards"]) == entry["num_samples"]
        for shard in entry["shards"]:
            data = (root / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            reference = root / "reference.idx"
            subprocess.run([str(WDS2IDX), str(root / shard["file"]), str(reference)], check=True, capture_output=True)
            assert (root / shard["index"]).read_text() == reference.read_text()
            reference.unlink()
            with tarfile.open(root / shard["file"]) as tf:
                assert len(tf.getnames()) == 3 * shard["num_samples"]  # image, cls, json
    return manifest


def test_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    assert prepare("digits", "--out", tmp_path, "--shard-size", 700) == 0
    manifest = check_shards(tmp_path)
    assert (manifest["image_size"], manifest["channels"], manifest["num_classes"]) == (8, 1, 10)
    assert manifest["splits"]["train"]["num_samples"] == 1617 and manifest["splits"]["test"]["num_samples"] == 180
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "test")] == [3, 1]
    digits = load_digits()
    pairs = zip(digits.images, digits.target, strict=True)
    expected = {(np.round(im * 255 / 16).astype(np.uint8).tobytes(), int(y)) for im, y in pairs}
    samples = list(iter_samples(tmp_path, "test"))
    assert all(image.shape == (8, 8, 1) for image, _, _ in samples)
    assert all((image[..., 0].tobytes(), label) in expected for image, label, _ in samples)


def test_digits_upsampled_and_deterministic(tmp_path: Path) -> None:
    assert prepare("digits", "--out", tmp_path / "a", "--size", 16, "--test-fraction", 0.5) == 0
    assert prepare("digits", "--out", tmp_path / "b", "--size", 16, "--test-fraction", 0.5) == 0
    assert prepare("digits", "--out", tmp_path / "c", "--size", 16, "--test-fraction", 0.5, "--seed", 1) == 0
    a, b, c = (read_manifest(tmp_path / d) for d in "abc")
    assert a["splits"] == b["splits"] and a["splits"] != c["splits"]
    image, _, _ = next(iter_samples(tmp_path / "a", "test"))
    assert image.shape == (16, 16, 1)
    assert np.array_equal(image, np.repeat(np.repeat(image[::2, ::2], 2, 0), 2, 1))  # nearest: 2x2 blocks


def test_folder_classes_attributes_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert prepare("folder", "--src", src, "--out", out, "--size", 8, "--classes", "--attributes",
                   src / "attrs.txt", "--test-fraction", 0.2, "--shard-size", 3, "--workers", 2) == 0
    assert "dogs/broken.png" in capsys.readouterr().err
    manifest = check_shards(out)
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["items"][0]["path"] == "dogs/broken.png"
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["attribute_names"] == ["Smiling", "Young"]
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["test"]["num_samples"] == 10
    samples = [s for split in ("train", "test") for s in iter_samples(out, split)]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image, _, _ in samples)
    assert sorted(label for _, label, _ in samples) == [0] * 5 + [1] * 5
    assert all(set(attrs) == {"Smiling", "Young"} and attrs["Smiling"] == -attrs["Young"] for _, _, attrs in samples)


def test_folder_jpeg_unlabeled_grayscale(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", corrupt=False)
    out = tmp_path / "out"
    assert prepare("folder", "--src", src, "--out", out, "--size", 6, "--channels", 1, "--format", "jpeg",
                   "--quality", 90) == 0
    manifest = check_shards(out)
    assert (manifest["image_ext"], manifest["channels"], manifest["num_classes"]) == ("jpg", 1, 0)
    assert {label for _, label, _ in iter_samples(out, "train")} == {-1}


def test_cifar10(tmp_path: Path) -> None:
    rows = make_cifar(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "out"
    assert prepare("cifar10", "--src", tmp_path / "cifar-10-python.tar.gz", "--out", out) == 0
    manifest = check_shards(out)
    assert manifest["splits"]["train"]["num_samples"] == 20 and manifest["splits"]["test"]["num_samples"] == 3
    assert manifest["class_names"][:2] == ["airplane", "automobile"] and manifest["image_size"] == 32
    test = [image for image, _, _ in iter_samples(out, "test")]
    expected = rows["test_batch"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(np.stack(test), expected)  # PNG is lossless and the test split keeps its order
    assert prepare("cifar10", "--src", tmp_path / "cifar-10-python.tar.gz", "--out", tmp_path / "x",
                   "--test-fraction", 0.2) == 2


def test_cifar10_archive_whose_pickle_runs_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from helpers import RunsCode

    marker = tmp_path / "MARKER"
    make_cifar(tmp_path / "cifar.tar.gz", plant={"data_batch_3": RunsCode(marker)})
    code = prepare("cifar10", "--src", tmp_path / "cifar.tar.gz", "--out", tmp_path / "out")
    assert not marker.exists(), "the archive's code ran"
    err = capsys.readouterr().err
    assert code == 2 and "a batch's pickle names posix.system" in err and "none of it was executed" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_overwrite_protection(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare("digits", "--out", tmp_path) == 0
    first = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare("digits", "--out", tmp_path, "--test-fraction", 0.5) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "manifest.json").read_text()) == first  # untouched
    assert prepare("digits", "--out", tmp_path, "--test-fraction", 0.5, "--shard-size", 5000, "--overwrite") == 0
    assert read_manifest(tmp_path)["splits"]["test"]["num_samples"] == 898
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "notes.txt", "test-000000.idx", "test-000000.tar", "train-000000.idx", "train-000000.tar"]


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare("folder", "--src", tmp_path / "nowhere", "--out", tmp_path / "o", "--size", 8) == 2
    assert "not a directory" in capsys.readouterr().err
    assert prepare("folder", "--src", tmp_path, "--out", tmp_path / "o") == 2
    assert "--size" in capsys.readouterr().err
