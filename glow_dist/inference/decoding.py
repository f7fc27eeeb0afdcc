"""Sampling and decoding: one interface, three ways to run it (`runtime.sample_mode`, the commands' `--decode-mode`),
and the sample grids that the trainer logs and `glow-dist sample` writes.

    decoder = Decoder(model, mode="auto")
    x = decoder.sample(16, temperature=0.7, seed=0)    # continuous images, about [-0.5, 0.5]
    x = decoder.decode(zs)                             # the inverse of model.encode, zs finest level first
    grid = temperature_grid(decoder, [0, 0.7, 1], per_row=16)   # uint8 rows, one per temperature

Both run one pure function of tensors: `Glow.decode_noise(eps, temperature, y)` (sampling, with the standard-normal
draws made beforehand from a generator seeded by `seed`, so every mode and every batch split sees the same draws) and
`Glow.decode(zs, y)`. The temperature is a 0-dim tensor, so a new temperature neither recompiles nor recaptures.

- `eager`: plain PyTorch, one ATen operator (one or more kernel launches on a GPU) at a time.
- `compiled`: the function through `torch.compile` (Inductor fuses the elementwise chains; convolutions stay
  cuDNN/oneDNN calls). Shapes are static: a partial last chunk is padded to the chunk size (padded rows are zeros,
  decoded and dropped: the rows of a batch do not interact), so one compilation serves a whole run.
- `graphed` (CUDA): the eager function captured into a CUDA graph over static input buffers (draws or latents,
  temperature, labels) and replayed; the output is copied out of the graph's buffer after each replay. One graph
  per (function, chunk size, labelled or not), at most `max_graphs` of them (least recently used dropped).
- `auto`: `graphed` on CUDA, `eager` on CPU (BENCHMARKS.md "GPU speed (issue 13)": on the 2-core VM the first
  compiled call took minutes, for ~30% less CPU time per decode after it; a command or a run decodes a few times).

Never silently wrong: the first call of each compiled or graphed shape is compared with the eager function on the
same inputs, and a failure to compile or capture, or a mismatch, switches the decoder to eager with one log line
(the capture and its check are glow_dist.runtime.capture_graph, shared with the graphed training step).
"""
from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from glow_dist.model import Glow, postprocess
from glow_dist.runtime import capture_graph, first_mismatch, release_graph_memory, resolve_mode


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _sample_fn(model: Glow, inputs: list[torch.Tensor], temperature: torch.Tensor,
               y: torch.Tensor | None) -> torch.Tensor:
    return model.decode_noise(inputs, temperature, y)


def _decode_fn(model: Glow, inputs: list[torch.Tensor], temperature: torch.Tensor,
               y: torch.Tensor | None) -> torch.Tensor:
    return model.decode(inputs, y)


_FUNCTIONS = {"sample": _sample_fn, "decode": _decode_fn}


class _Graph:
    """One captured call: static inputs, the graph, and its output buffer."""

    def __init__(self, inputs: list[torch.Tensor], temperature: torch.Tensor, y: torch.Tensor | None):
        self.inputs = [x.clone() for x in inputs]
        self.temperature = temperature.clone()
        self.y = y.clone() if y is not None else None
        self.graph: torch.cuda.CUDAGraph | None = None   # set by the capture
        self.out: torch.Tensor | None = None

    def load(self, inputs: list[torch.Tensor], temperature: torch.Tensor, y: torch.Tensor | None) -> None:
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x)
        self.temperature.copy_(temperature)
        if y is not None:
            self.y.copy_(y)


class Decoder:
    """Latents (or prior draws) -> continuous images of one model, in the mode asked for (see the module doc)."""

    warmup_passes = 2   # eager passes on a side stream before a capture (cuDNN autotuning, lazy inits)

    def __init__(self, model: Glow, mode: str = "auto", log: Callable[[str], None] = _stderr, max_graphs: int = 4):
        self.model, self.asked, self.log, self.max_graphs = model, mode, log, max_graphs
        self.device = next(model.parameters()).device
        self.mode, self.reason = resolve_mode(mode, self.device)   # reason: why not the mode asked for ("": it is)
        if self.reason:
            log(f"[decode] mode={mode}: running eager, because {self.reason}")
        self._compiled = {kind: torch.compile(fn, dynamic=False) for kind, fn in _FUNCTIONS.items()} \
            if self.mode == "compiled" else {}
        self._checked: set[tuple] = set()                  # compiled shapes already compared with eager
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    def noise(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Standard-normal draws for n samples, one tensor per latent (finest first), drawn top level first."""
        shapes = self.model.latent_shapes()
        eps = [torch.randn((n, *s), generator=generator, device=self.device) for s in reversed(shapes)]
        return eps[::-1]

    @torch.no_grad()
    def sample(self, n: int, temperature: float, labels: torch.Tensor | None = None, seed: int = 0,
               batch_size: int | None = None) -> torch.Tensor:
        """n images with every prior's std times `temperature`, from draws fixed by `seed` (the same whatever the
        mode and `batch_size`: all of them are drawn first, in one sequence)."""
        if self.model.cfg.y_condition and labels is None:
            labels = torch.arange(n, device=self.device) % self.model.cfg.num_classes
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._chunked("sample", self.noise(n, generator), temperature, labels, batch_size or n)

    @torch.no_grad()
    def decode(self, zs: list[torch.Tensor], labels: torch.Tensor | None = None,
               batch_size: int = 64) -> torch.Tensor:
        """The images of latents (one tensor per level, finest first), decoded `batch_size` at a time."""
        if self.model.cfg.y_condition and labels is None:
            # The label only shifts the top prior, which decoding given latents never reads.
            labels = torch.zeros(len(zs[0]), dtype=torch.long, device=self.device)
        return self._chunked("decode", [z.to(self.device) for z in zs], 1.0, labels, batch_size)

    def _chunked(self, kind: str, inputs: list[torch.Tensor], temperature: float, labels: torch.Tensor | None,
                 batch_size: int) -> torch.Tensor:
        n = len(inputs[0])
        size = max(1, min(batch_size, n))
        t = torch.tensor(float(temperature), device=self.device)
        y = labels.to(self.device) if labels is not None else None
        if y is not None:
            self.model.check_labels(y)  # here, on the host: a graph's capture skips it
        out = []
        for start in range(0, n, size):
            part = [x[start:start + size] for x in inputs]
            part_y = y[start:start + size] if y is not None else None
            out.append(self._run(kind, part, t, part_y, size))
        return torch.cat(out)

    def _run(self, kind: str, inputs: list[torch.Tensor], t: torch.Tensor, y: torch.Tensor | None,
             size: int) -> torch.Tensor:
        if self.mode == "eager":
            return _FUNCTIONS[kind](self.model, inputs, t, y)
        m = len(inputs[0])
        if m < size:  # static shapes: pad a partial chunk with zero rows, decoded and dropped
            inputs = [torch.cat([x, x.new_zeros(size - m, *x.shape[1:])]) for x in inputs]
            y = torch.cat([y, y.new_zeros(size - m)]) if y is not None else None
        out = self._compiled_run(kind, inputs, t, y) if self.mode == "compiled" else self._graphed_run(kind, inputs,
                                                                                                        t, y)
        if out is None:  # fell back to eager (logged)
            return _FUNCTIONS[kind](self.model, [x[:m] for x in inputs], t, y[:m] if y is not None else None)
        return out[:m]

    def _fall_back(self, why: str, logged: bool = False) -> None:
        """Decode eagerly from now on, and free the graphs' buffers and pools; `why` is logged (unless `logged`:
        the capture did)."""
        if not logged:
            self.log(f"[decode] mode={self.asked}: running eager, because {why}")
        self.mode, self.reason = "eager", why
        self._compiled.clear()
        self._graphs.clear()
        release_graph_memory()

    def _compiled_run(self, kind: str, inputs: list[torch.Tensor], t: torch.Tensor,
                      y: torch.Tensor | None) -> torch.Tensor | None:
        key = (kind, len(inputs[0]), y is not None)
        try:
            out = self._compiled[kind](self.model, inputs, t, y)
        except Exception as e:  # noqa: BLE001 - any compile failure means: run eagerly, and say why
            self._fall_back(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        if key not in self._checked:
            mismatch = first_mismatch([_FUNCTIONS[kind](self.model, inputs, t, y)], [out], atol=1e-4)
            if mismatch:
                self._fall_back(f"the compiled {kind} differs from eager ({mismatch})")
                return None
            self._checked.add(key)
        return out

    def _graphed_run(self, kind: str, inputs: list[torch.Tensor], t: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor | None:
        key = (kind, len(inputs[0]), y is not None)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(kind, inputs, t, y)
            if graph is None:
                return None
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph.load(inputs, t, y)
        graph.graph.replay()
        return graph.out.clone()  # the next replay overwrites the graph's buffer

    def _capture(self, kind: str, inputs: list[torch.Tensor], t: torch.Tensor,
                 y: torch.Tensor | None) -> _Graph | None:
        fn = _FUNCTIONS[kind]
        graph = _Graph(inputs, t, y)
        captured = capture_graph(lambda: fn(self.model, graph.inputs, graph.temperature, graph.y),
                                 warmup_passes=self.warmup_passes, log=self.log,
                                 what=f"[decode] mode={self.asked} ({kind})", tensors=lambda out: [out])
        if isinstance(captured, str):
            self._fall_back(captured, logged=True)
            return None
        graph.graph, graph.out = captured
        self.log(f"[decode] graphed: {kind} captured for batch {len(inputs[0])}")
        return graph


def as_decoder(model_or_decoder: Glow | Decoder, mode: str = "eager") -> Decoder:
    """A Decoder as given, or a new one of `mode` for a bare model (the functions below take either)."""
    return model_or_decoder if isinstance(model_or_decoder, Decoder) else Decoder(model_or_decoder, mode)


# ---- sample grids ---------------------------------------------------------------------------------------------------

def display_scale(image_size: int) -> int:
    """How much to enlarge tiles so that tiny images (8x8 digits) show at about 64 pixels."""
    return max(1, 64 // image_size)


def image_grid(images: torch.Tensor, ncols: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows*H, ncols*W, C) uint8 array with `pad` black pixels between tiles."""
    n, c, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid


def grid_columns(n: int) -> int:
    """Columns of a roughly square grid of n tiles."""
    return math.ceil(math.sqrt(n))


def sample_images(model: Glow | Decoder, n: int, temperature: float, labels: torch.Tensor | None = None,
                  seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """n uint8 images at `temperature`, from a fixed seed so grids of different steps are comparable.

    `model` is a Glow (decoded eagerly) or a Decoder of one (compiled or CUDA-graphed; keep one for repeated calls:
    it compiles or captures once). `batch_size` bounds how many are decoded at once (a 256x256 model cannot take 64
    in one pass); the draws, and so the images, do not depend on it.
    """
    decoder = as_decoder(model)
    return postprocess(decoder.sample(n, temperature, labels=labels, seed=seed, batch_size=batch_size),
                       decoder.model.cfg.n_bits)


def temperature_grid(model: Glow | Decoder, temperatures: list[float], per_row: int, seed: int = 0,
                     labels: torch.Tensor | None = None, ncols: int | None = None,
                     batch_size: int | None = None) -> np.ndarray:
    """`per_row` samples for each temperature, one row each (`ncols` < per_row wraps a row onto several)."""
    decoder = as_decoder(model)
    rows = [sample_images(decoder, per_row, t, labels=labels, seed=seed, batch_size=batch_size)
            for t in temperatures]
    return image_grid(torch.cat(rows), ncols=ncols or per_row)


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, C) uint8 array; `scale` enlarges tiny images (8x8 digits) with nearest neighbour."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
