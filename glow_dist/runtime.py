"""The runtime choices (`runtime.*` in the config) made concrete on a device: one resolver per `auto`, TF32, and the
one capture-verify-fallback engine that the graphed training step and graphed decoding share.

    mode, reason = resolve_mode("auto", device, step_capture_blockers(cfg))  # eager | compiled | graphed, and why
    captured = capture_graph(run, warmup_passes=3, log=print, what="[step]")  # a CUDA graph, or why not (logged)

Every mode is "never silently wrong": a configuration a mode cannot run falls back to eager with one log line
saying why, and a captured graph's first replay is compared with the eager pass it was captured from.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from glow_dist.config import Config


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


def step_capture_blockers(cfg: Config) -> list[str]:
    """Why this configuration's training step cannot be captured into a CUDA graph ([] when it can). Gradient
    checkpointing can: its segments draw no random numbers, so they run with preserve_rng_state=False and never
    touch the CUDA generator's state (forbidden under capture; glow_dist/model/glow.py, Level.flow)."""
    blockers = []
    if cfg.runtime.memory == "invertible":
        blockers.append("runtime.memory=invertible runs its own backward (not yet captured on a GPU)")
    if cfg.dist.elastic:
        blockers.append("dist.elastic=true may rebuild the world between steps")
    return blockers


def device_memory_bytes(device: torch.device, ranks_sharing: int = 1) -> int:
    """One rank's share of its device's memory, for `runtime.memory: auto`: a GPU's total memory (one rank per GPU),
    or the host's RAM divided among the ranks on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_sharing)


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
                  before_capture: Callable[[], None] | None = None) -> Captured | str:
    """Capture `run()` into a CUDA graph and check its first replay against eager; or log why not and return that
    reason (a str: the caller runs eagerly, after dropping its static buffers and calling `release_graph_memory`).

    `run` works on static buffers (inputs copied in before each replay). It runs `warmup_passes` times eagerly on a
    side stream (cuDNN autotuning, lazy library state such as cuBLAS workspaces and cuSOLVER handles are created
    there), then is captured on that same stream (`stream=side`), so nothing per-stream is first created inside the
    capture. `capture_error_mode="thread_local"`: other threads (DALI's GPU decoding, the DataLoader's pin-memory
    thread, Horovod's background loop) may use CUDA while this one captures; only this thread's calls are checked.
    Whatever the capture allocates (activations, and the gradients of a training step whose `run` sets them to None
    first) comes from the graph's private pool and lives as long as the graph. The first replay runs on the side
    stream too; the caller's stream then waits for it, and later replays run on the caller's stream, in order with
    the copies into the static inputs before them and the reads of the outputs after them.
    `tensors(out)` lists what to compare between the last eager pass and the replay; `before_capture` runs in between
    (the training step frees the warm-up's gradients there, before the capture empties the allocator's cache).
    `what` names it in the log.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # the static inputs were written on the caller's stream
        with torch.cuda.stream(side):
            for _ in range(warmup_passes):
                eager = [t.detach().clone() for t in tensors(run())]
            if before_capture is not None:
                before_capture()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                outputs = run()
            graph.replay()
        torch.cuda.current_stream().wait_stream(side)  # everything after runs on the caller's stream
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly, and say why
        reason = f"the CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"{what}: running eager, because {reason}")
        return reason
    mismatch = first_mismatch(eager, [t.detach() for t in tensors(outputs)])
    if mismatch:
        reason = f"the graph's replay differs from the eager pass ({mismatch})"
        log(f"{what}: running eager, because {reason}")
        return reason
    return Captured(graph, outputs)


def release_graph_memory() -> None:
    """Give the allocator's cached blocks back to the device, after a fallback has dropped its graph and buffers:
    a graph's private pool is only freed once nothing references it, and then stays cached until emptied."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
