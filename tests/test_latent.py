"""Latent-space tools on real checkpoints: checkpoints trained by the real trainer on shards written by `prepare`.

The main model is trained on the digits prepared with `prepare folder --attributes` and an `is_zero` attribute,
so the attribute direction can be checked against a nearest-mean classifier on pixels.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RunsCode
from PIL import Image

from glow_dist.cli import main as cli
from glow_dist.data import iter_samples
from glow_dist.inference.decoding import temperature_grid
from glow_dist.inference.latents import attribute_direction, decode_latents, encode_images, quantized, shift
from glow_dist.inference.loading import load_model

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config", "configs/debug.yaml", "train.threads=1", "train.progress=false", "train.eval_every=1000",
         "train.sample_every=1000", "train.checkpoint_every=1000", "train.max_eval_batches=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Other test processes share the cores; torch's spinning worker threads slow 8x8 models down tenfold then.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zero_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1,797 digits as PNG files plus a list_attr-style file with `is_zero`, prepared with --attributes."""
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("zero")
    (base / "png").mkdir()
    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
    lines = [str(len(pixels)), "is_zero"]
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        Image.fromarray(image).save(base / "png" / f"{i:04d}.png")
        lines.append(f"{i:04d}.png {1 if label == 0 else -1}")
    (base / "list_attr.txt").write_text("\n".join(lines) + "\n")
    assert cli(["prepare", "folder", "--src", str(base / "png"), "--size", "8", "--channels", "1", "--workers", "1",
                "--attributes", str(base / "list_attr.txt"), "--out", str(base / "shards")]) == 0
    return base / "shards"


@pytest.fixture(scope="module")
def runs(zero_data: Path, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two run dirs, trained at once: `main` (debug model on zero_data) and `other` (a narrower class-conditional
    model on the digits shards, for the foreign-latents and label errors)."""
    base = tmp_path_factory.mktemp("runs")
    jobs = {
        "main": [f"data.root={zero_data}", "train.steps=30"],
        "other": [f"data.root={digits_shards}", "train.steps=2", "model.width=8", "model.y_condition=true",
                  "model.num_classes=10"],
    }
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "glow_dist", "train", *TRAIN, *extra, f"train.run_dir={base / name}",
         f"tracking.local_dir={base / name / 'mlflow'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name, extra in jobs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"training {name} failed:\n{out[-4000:]}"
    return {name: base / name for name in jobs}


@pytest.fixture(scope="module")
def test_images(zero_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The first test-split images of zero_data as PNG files, as a user would pass them."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, (image, _, _) in zip(range(6), iter_samples(zero_data, "test"), strict=False):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    return paths


def read_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def expected(path: Path, n_bits: int = 5) -> np.ndarray:
    """What a decode must give back: the image quantized to the model's n_bits."""
    return quantized(torch.from_numpy(read_png(path)), n_bits).numpy()


def tiles(strip: np.ndarray, n: int, size: int = 8) -> list[np.ndarray]:
    """The n tiles of a one-row grid written with --scale 1 (1 pixel of padding around each)."""
    return [strip[1:1 + size, 1 + i * (size + 1): 1 + i * (size + 1) + size] for i in range(n)]


def test_encode_decode_round_trip_is_exact(runs, test_images, tmp_path, capsys):
    big = tmp_path / "big.png"  # a wrong-size input: resized and cropped like `prepare`, with a note
    Image.open(test_images[0]).resize((16, 12), Image.Resampling.NEAREST).save(big)
    latents = tmp_path / "latents.npz"
    assert cli(["encode", "--checkpoint", str(runs["main"]), "--images", *map(str, test_images), str(big),
                "--out", str(latents)]) == 0
    assert "resized and center-cropped to 8x8" in capsys.readouterr().err

    with np.load(latents) as f:
        assert {"z0", "z1", "names", "checkpoint", "checkpoint_sha256", "step", "n_bits"} <= set(f.files)
        assert f["z0"].shape == (7, 2, 4, 4) and f["z1"].shape == (7, 8, 2, 2)
        assert int(f["step"]) == 30 and int(f["n_bits"]) == 5 and list(f["names"])[-1] == "big.png"

    assert cli(["decode", "--checkpoint", str(runs["main"]), "--latents", str(latents), "--out",
                str(tmp_path / "dec")]) == 0
    for path in test_images:
        np.testing.assert_array_equal(read_png(tmp_path / "dec" / path.name), expected(path))
    assert read_png(tmp_path / "dec" / "big.png").shape == (8, 8)


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_endpoints_equal_inputs(runs, test_images, tmp_path, mode):
    a, b = test_images[0], test_images[1]
    out = tmp_path / "strip.png"
    assert cli(["interpolate", "--checkpoint", str(runs["main"]), "--a", str(a), "--b", str(b), "--steps", "5",
                "--mode", mode, "--scale", "1", "--out", str(out)]) == 0
    strip = tiles(read_png(out), 5)
    np.testing.assert_array_equal(strip[0], expected(a))
    np.testing.assert_array_equal(strip[-1], expected(b))
    assert not np.array_equal(strip[2], strip[0]) and not np.array_equal(strip[2], strip[-1])


def test_manipulate_alpha_zero_reproduces_input_and_caches_direction(runs, zero_data, test_images, tmp_path):
    out = tmp_path / "strip.png"
    args = ["manipulate", "--checkpoint", str(runs["main"]), "--data", str(zero_data), "--attribute", "is_zero",
            "--image", str(test_images[0]), "--alphas", "-1,0,1", "--scale", "1", "--out", str(out)]
    assert cli(args) == 0
    np.testing.assert_array_equal(tiles(read_png(out), 3)[1], expected(test_images[0]))

    loaded = load_model(runs["main"])
    cache = loaded.path.with_name(loaded.path.name + ".directions") / "is_zero.pt"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    attribute_direction(loaded, zero_data, "is_zero")
    assert cache.stat().st_mtime_ns == stamp  # served from the cache

    # Re-prepared data (here: the same shards under a changed manifest) invalidates the cached direction.
    changed = tmp_path / "changed"
    shutil.copytree(zero_data, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    (changed / "manifest.json").write_text(json.dumps({**manifest, "seed": 1}))
    attribute_direction(loaded, changed, "is_zero")
    assert cache.stat().st_mtime_ns != stamp
    key = torch.load(cache, weights_only=True)["key"]
    assert key["manifest_sha256"] == hashlib.sha256((changed / "manifest.json").read_bytes()).hexdigest()
    assert key["checkpoint_sha256"] == loaded.sha256 and key["step"] == 30

    # A planted cache file whose pickle would run code is refused unread, and the direction recomputed over it.
    torch.save({"key": key, "direction": RunsCode(tmp_path / "MARKER")}, cache)
    attribute_direction(loaded, changed, "is_zero")
    assert not (tmp_path / "MARKER").exists() and torch.load(cache, weights_only=True)["key"] == key


def test_attribute_direction_makes_digits_look_like_zeros(runs, zero_data):
    loaded = load_model(runs["main"])
    direction = attribute_direction(loaded, zero_data, "is_zero", cache=False)
    assert all(d.abs().max() > 0 for d in direction)

    # Nearest-mean classifier on pixels, class means from the training split.
    train = list(iter_samples(zero_data, "train"))
    pixels = quantized(torch.from_numpy(np.stack([im for im, _, _ in train])), 5).float().flatten(1)
    is_zero = torch.tensor([a["is_zero"] == 1 for _, _, a in train])
    mean_zero, mean_other = pixels[is_zero].mean(0), pixels[~is_zero].mean(0)

    def zero_fraction(images: torch.Tensor) -> float:
        flat = images.float().flatten(1)
        return float(((flat - mean_zero).norm(dim=1) < (flat - mean_other).norm(dim=1)).float().mean())

    test = torch.from_numpy(np.stack([im for im, _, _ in iter_samples(zero_data, "test")])).permute(0, 3, 1, 2)
    alphas = [-1.0, 0.0, 1.0]
    decoded = decode_latents(loaded.model, shift(encode_images(loaded.model, test), direction, alphas))
    minus, zero, plus = (zero_fraction(decoded[i::3]) for i in range(3))
    # About a tenth of the test digits are zeros; +1 should turn most of them into zeros, -1 none.
    assert 0.02 < zero < 0.3, zero
    assert plus > zero + 0.4, (minus, zero, plus)
    assert minus <= zero


def test_sample_uses_the_trainer_grid_code(runs, tmp_path, capsys):
    out = tmp_path / "rows.png"
    assert cli(["sample", "--checkpoint", str(runs["main"]), "--n", "4", "--temperature", "0,0.7", "--scale", "1",
                "--out", str(out)]) == 0
    model = load_model(runs["main"], torch.device("cpu")).model
    np.testing.assert_array_equal(read_png(out), temperature_grid(model, [0.0, 0.7], 4)[..., 0])
    # A decode mode this machine cannot run: one line says so, and the grid is the same.
    capsys.readouterr()
    graphed = tmp_path / "graphed.png"
    assert cli(["sample", "--checkpoint", str(runs["main"]), "--n", "4", "--temperature", "0,0.7", "--scale", "1",
                "--decode-mode", "graphed", "--out", str(graphed)]) == 0
    assert capsys.readouterr().err.count("CUDA graphs need a CUDA device") == 1
    np.testing.assert_array_equal(read_png(graphed), read_png(out))

    square = tmp_path / "square.png"
    assert cli(["sample", "--checkpoint", str(runs["other"]), "--n", "9", "--label", "3", "--scale", "1",
                "--out", str(square)]) == 0
    assert read_png(square).shape == (3 * 9 + 1, 3 * 9 + 1)


def test_user_errors_are_one_clear_line(runs, zero_data, test_images, tmp_path, capsys):
    main, other = str(runs["main"]), str(runs["other"])
    latents = tmp_path / "l.npz"
    assert cli(["encode", "--checkpoint", main, "--images", str(test_images[0]), "--out", str(latents)]) == 0
    capsys.readouterr()
    cases = [
        (["manipulate", "--checkpoint", main, "--data", str(zero_data), "--attribute", "Smiling", "--image",
          str(test_images[0]), "--out", str(tmp_path / "m.png")], "unknown attribute 'Smiling'"),
        (["sample", "--checkpoint", other, "--label", "10", "--out", str(tmp_path / "s.png")], "out of range"),
        (["sample", "--checkpoint", main, "--label", "1", "--out", str(tmp_path / "s.png")], "class-conditional"),
        (["decode", "--checkpoint", other, "--latents", str(latents), "--out", str(tmp_path / "d")],
         "come from another model"),
        (["encode", "--checkpoint", main, "--images", str(tmp_path / "nope.png"), "--out", str(latents)],
         "does not exist"),
        (["interpolate", "--checkpoint", main, "--a", str(test_images[0]), "--b", str(tmp_path / "nope.png"),
          "--out", str(tmp_path / "i.png")], "does not exist"),
    ]
    for args, message in cases:
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_latents_of_a_model_that_differs_only_in_runtime_choices_decode(runs, test_images, tmp_path):
    """Latents written by a model with other speed-only choices (the old layout kept them inside `model_config`:
    channels_last, compile, memory) decode with this checkpoint: only the architecture has to match."""
    latents = tmp_path / "l.npz"
    assert cli(["encode", "--checkpoint", str(runs["main"]), "--images", str(test_images[0]), "--out",
                str(latents)]) == 0
    with np.load(latents) as f:
        arrays = {k: f[k] for k in f.files}
    saved = json.loads(str(arrays["model_config"]))
    saved.update(channels_last="true", compile=True, memory="invertible", autocast="bf16")
    arrays["model_config"] = np.array(json.dumps(saved))
    np.savez(latents, **arrays)
    assert cli(["decode", "--checkpoint", str(runs["main"]), "--latents", str(latents), "--out",
                str(tmp_path / "d")]) == 0
    assert np.array_equal(read_png(tmp_path / "d" / f"{test_images[0].stem}.png"), expected(test_images[0]))
