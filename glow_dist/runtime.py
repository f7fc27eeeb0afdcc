"""The runtime choices (`runtime.*` in the config) made concrete on a device: one resolver per `auto`, TF32, and the
one capture-verify-fallback engine that the graphed training step and graphed decoding share.

    mode, reason = resolve_mode("auto", device)               # eager | compiled | graphed, and why not the asked one
    captured = capture_graph(run, warmup_passes=3, log=print)  # a CUDA graph of run(), or None (logged) -> eager

Every mode is "never silently wrong": a configuration a mode cannot run falls back to eager with one log line
saying why, and a captured graph's first replay is compared with the eager pass it was captured from.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch


def resolve_mode(asked: str, device: torch.device, blockers: Sequence[str] = ()) -> tuple[str, str]:
    """(mode, reason) for `runtime.step_mode` and `runtime.sample_mode`: auto is graphed on CUDA and eager on a CPU
    (measured there: compiling paid for itself only after minutes, BENCHMARKS.md); graphed needs a CUDA device and
    none of `blockers` (the caller's reasons why its work cannot be captured). `reason` says why the mode that runs
    is not the one asked for ("" when it is)."""
    if asked == "auto":
        asked = "graphed" if device.type == "cuda" else "eager"
        if asked == "eager":
            return "eager", ""
    if asked != "graphed":
        return asked, ""
    reasons = ([] if device.type == "cuda" else [f"CUDA graphs need a CUDA device (this runs on {device.type})"])
    reasons += list(blockers)
    return ("eager", "; ".join(reasons)) if reasons else ("graphed", "")


def channels_last_on(setting: str, device_type: str) -> bool:
    """`runtime.channels_last` on a device kind: auto is NHWC on CPU only (oneDNN +13%; cuDNN on an H100 -20%)."""
    return setting == "true" or (setting == "auto" and device_type == "cpu")


def bf16_on(setting: str) -> bool:
    """`runtime.autocast`: auto is fp32 on every device (bf16 measured slower on an H100; the CPU stays exact)."""
    return setting == "bf16"


def apply_tf32(setting: str, device: torch.device) -> None:
    """`runtime.tf32` on a CUDA device: auto keeps torch's defaults (cuDNN convolutions in TF32, matmuls in fp32,
    what the H100 measurements used), true allows TF32 for both, false for neither. Nothing to do on a CPU."""
    if device.type != "cuda" or setting == "auto":
        return
    on = setting == "true"
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def first_mismatch(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor], rtol: float = 1e-3,
                   atol: float = 1e-5) -> str:
    """'' when every `got` tensor equals its `expected` one within fp32/TF32 tolerance (atol relative to the
    tensor's largest value; non-finite values must sit in the same places), else which one differs and how much."""
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        scale = max(1.0, a.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().item()) if a.numel() else 1.0
        if not torch.allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=True):
            worst = (a - b).abs().nan_to_num(float("inf")).max().item()
            return f"output {i}: max difference {worst:.3g}"
    return ""


class Captured(NamedTuple):
    graph: Any                 # torch.cuda.CUDAGraph: replay() reruns the captured work on the same buffers
    outputs: Any               # what run() returned inside the capture: the graph's output buffers


def capture_graph(run: Callable[[], Any], *, warmup_passes: int, log: Callable[[str], None], what: str,
                  tensors: Callable[[Any], Sequence[torch.Tensor]] = lambda out: out,
                  before_capture: Callable[[], None] | None = None) -> Captured | None:
    """Capture `run()` into a CUDA graph, check its first replay against eager, or say why not and return None.

    `run` works on static buffers (inputs copied in before each replay). It runs `warmup_passes` times eagerly on a
    side stream (cuDNN autotuning, lazy library state such as cuBLAS workspaces and cuSOLVER handles are created
    there), then is captured on that same stream, so nothing per-stream is first created inside the capture.
    `capture_error_mode="thread_local"`: other threads (DALI's GPU decoding, the DataLoader's pin-memory thread,
    Horovod's background loop) may use CUDA while this one captures; only this thread's calls are checked.
    `tensors(out)` lists what to compare between the last eager pass and the replay; `before_capture` runs in between
    (the training step clears gradients there, so the capture allocates its own). `what` names it in the log.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_passes):
                eager = [t.detach().clone() for t in tensors(run())]
            if before_capture is not None:
                before_capture()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                outputs = run()
            graph.replay()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly, and say why
        log(f"{what}: running eager, because the CUDA graph capture failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}")
        return None
    mismatch = first_mismatch(eager, [t.detach() for t in tensors(outputs)])
    if mismatch:
        log(f"{what}: running eager, because the graph's replay differs from the eager pass ({mismatch})")
        return None
    return Captured(graph, outputs)
