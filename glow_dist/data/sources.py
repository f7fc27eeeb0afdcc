"""Image sources for `glow-dist prepare`: digits (embedded in scikit-learn), a folder of images, CIFAR-10.

A source is a list of light `Item`s per split, in a deterministic order; `load_item` turns one into the final
square uint8 image. Items are plain tuples and `load_item` a top-level function so a process pool can run it.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from glow_dist.data.manifest import DataError
from glow_dist.data.samples import image_header
from glow_dist.safe_pickle import UnsafePickleError, load_arrays_pickle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Item(NamedTuple):
    source_id: str            # file path relative to --src, or "batch:index": reported when unreadable
    payload: Any              # np.ndarray of pixels, or the absolute path of an image file
    label: int                # class id, -1 when the source has no classes
    attrs: tuple[int, ...]    # +1/-1 per attribute name, () without attributes


@dataclass
class Source:
    name: str
    channels: int
    resample: str                                   # "nearest" (digits: keep the pixel blocks) or "bicubic"
    train: list[Item]
    test: list[Item]
    class_names: list[str] = field(default_factory=list)
    attribute_names: list[str] = field(default_factory=list)


def seeded_split(items: list[Item], test_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Shuffle once with `seed`; the first `test_fraction` is the test split, kept in source order for reading."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_test = int(round(len(items) * test_fraction))
    test = [items[i] for i in sorted(order[:n_test])]
    # The training order stays shuffled: loaders read contiguous parts per rank, which must be alike.
    train = [items[i] for i in order[n_test:]]
    return train, test


def digits_source(test_fraction: float, seed: int) -> Source:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (values 0..16, scaled to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    items = [Item(f"digits:{i}", pixels[i], int(y), ()) for i, y in enumerate(digits.target)]
    train, test = seeded_split(items, test_fraction, seed)
    return Source("digits", 1, "nearest", train, test, class_names=[str(c) for c in digits.target_names])


def read_attributes(path: str | Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """CelebA list_attr_celeba.txt: count, attribute names, then `filename v1 v2 ...` with 1/-1 (0 read as -1)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise DataError(f"attribute file {path} needs a count line and a names line")
    names = lines[1].split()
    table = {}
    for n, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1", "0") for v in fields[1:]):
            raise DataError(f"{path}:{n}: expected a filename and {len(names)} values of 1/-1, got {line[:80]!r}")
        table[fields[0]] = tuple(1 if v == "1" else -1 for v in fields[1:])
    return names, table


def folder_source(src: str | Path, channels: int, classes: bool, attributes: str | None,
                  test_fraction: float, seed: int) -> Source:
    """Every JPEG/PNG under `src` (sorted paths); class = first subfolder name with `classes`."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"--src {src} is not a directory of images")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no .jpg/.jpeg/.png files under {src}")
    rel = [p.relative_to(src).as_posix() for p in files]
    class_names: list[str] = []
    labels = [-1] * len(files)
    if classes:
        loose = [r for r in rel if "/" not in r]
        if loose:
            raise DataError(f"--classes takes the class from the subfolder, but {src / loose[0]} is in {src} itself")
        class_names = sorted({r.split("/")[0] for r in rel})
        labels = [class_names.index(r.split("/")[0]) for r in rel]
    attribute_names: list[str] = []
    attrs: list[tuple[int, ...]] = [()] * len(files)
    if attributes:
        attribute_names, table = read_attributes(attributes)
        missing = [p.name for p in files if p.name not in table]
        if missing:
            raise DataError(f"{len(missing)} images have no row in {attributes} (first: {missing[0]}); "
                            "remove them or add rows")
        attrs = [table[p.name] for p in files]
    items = [Item(r, str(p), y, a) for r, p, y, a in zip(rel, files, labels, attrs, strict=True)]
    train, test = seeded_split(items, test_fraction, seed)
    return Source("folder", channels, "bicubic", train, test, class_names, attribute_names)


def cifar10_source(archive: str | Path, seed: int) -> Source:
    """cifar-10-python.tar.gz: data_batch_1..5 are train (shuffled with `seed`), test_batch is test (in order)."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"--src {archive} not found; it should be the CIFAR-10 python archive cifar-10-python.tar.gz")
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                name = Path(member.name).name
                if member.isfile() and (name.startswith("data_batch_") or name in ("test_batch", "batches.meta")):
                    # The batches are pickles: read so that they can build arrays and nothing else.
                    batches[name] = load_arrays_pickle(tf.extractfile(member), encoding="bytes")
    except UnsafePickleError as e:
        raise DataError(f"{archive} refused: a batch's pickle names {e}, which a CIFAR-10 batch never holds (only "
                        "arrays, lists and strings). The file may be malicious; none of it was executed") from None
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{archive} is not a readable CIFAR-10 python archive: {e}") from None
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    absent = [n for n in needed if n not in batches]
    if absent:
        raise DataError(f"{archive} lacks {', '.join(absent)}; expected the CIFAR-10 python version")

    def items(name: str) -> list[Item]:
        batch = batches[name]
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return [Item(f"{name}:{i}", pixels[i], int(y), ()) for i, y in enumerate(batch[b"labels"])]

    train = [it for n in needed[:5] for it in items(n)]
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    meta = batches.get("batches.meta", {})
    names = [n.decode() for n in meta.get(b"label_names", [])] or [str(i) for i in range(10)]
    return Source("cifar10", 3, "bicubic", train, items("test_batch"), class_names=names)


def resize_square(image: Image.Image, size: int, resample: str) -> Image.Image:
    """Scale the shorter side to `size`, then center-crop to size x size."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    filt = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BICUBIC
    image = image.resize(new, filt)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def check_declared_size(path: str | Path) -> None:
    """ValueError for a file whose PNG/JPEG header declares more pixels than PIL's limit (a decompression bomb):
    refused from its first bytes, before PIL allocates anything. A header we cannot parse is left to PIL."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        width, height, _ = image_header(head)
    except ValueError:
        return
    if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
        raise ValueError(f"its header declares {width}x{height} pixels, more than {Image.MAX_IMAGE_PIXELS:,} "
                         "(a decompression bomb, or not a photo)")


def load_item(item: Item, size: int, channels: int, resample: str, fmt: str, quality: int) -> bytes:
    """The item's final image, encoded; raises OSError/ValueError for unreadable files (the caller skips them)."""
    if isinstance(item.payload, np.ndarray):
        image = Image.fromarray(item.payload[..., 0] if item.payload.shape[-1] == 1 else item.payload)
    else:
        check_declared_size(item.payload)
        with Image.open(item.payload) as f:
            f.load()  # decode now, so a truncated file fails here and not later
            image = f.copy()
    image = resize_square(image.convert("L" if channels == 1 else "RGB"), size, resample)
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
