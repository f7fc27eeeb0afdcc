"""The CUDA-graph paths (glow_dist/runtime.py capture_graph, the graphed step, graphed decoding) on a CPU, through
recording stand-ins for torch.cuda's stream and graph API (tests/cuda_standins.py): what every capture is given,
what the optimizer is handed after a decompressing all-reduce, and what a fallback logs, records and frees.

The `gpu` tests of test_step.py, test_decoder.py and test_gpu_stack.py run the same paths on a real GPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cuda_standins import FakeCuda, pin
from torch.utils._python_dispatch import TorchDispatchMode

from glow_dist.config import Config, load_config
from glow_dist.inference.decoding import Decoder
from glow_dist.model import build_model, preprocess
from glow_dist.runtime import first_mismatch
from glow_dist.training.ema import EMA
from glow_dist.training.step import EagerStep, GraphedStep, noise_generator

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def debug_cfg(*overrides: str) -> Config:
    return load_config(REPO / "configs/debug.yaml", ["optim.warmup_steps=0", "optim.grad_clip=0", *overrides])


def images(cfg: Config, seed: int, n: int = 8) -> torch.Tensor:
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), generator=g, dtype=torch.uint8)


def trained_like(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """The debug model, ActNorm initialized and every weight moved off its init (zero layers hide mistakes)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.runtime)
    labels = torch.arange(16) % cfg.model.num_classes if cfg.model.y_condition else None
    model.initialize(preprocess(images(cfg, 99, 16), cfg.model.n_bits, generator=noise_generator(CPU, 0, -1, 0)),
                     labels)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


class DecompressingAdamax(torch.optim.Adamax):
    """Horovod's DistributedOptimizer with fp16 compression as the step sees it (`clip_and_step` calls synchronize(),
    then step() under skip_synchronize()): synchronize() ends with `p.grad.set_(decompressed)`, as Horovod 0.28's
    does for every gradient, so each p.grad tensor object moves onto new memory. It records what step() is given."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.handed: list[list[torch.Tensor]] = []

    def synchronize(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.set_(p.grad.to(torch.float16).to(p.dtype))  # compress, "reduce" (one rank), decompress

    @contextmanager
    def skip_synchronize(self):
        yield

    def step(self, closure=None):
        self.handed.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def graphed_step(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 logs: list[str] | None = None, rank: int = 0) -> GraphedStep:
    """The graphed step built directly (build_train_step resolves graphed to eager on a CPU)."""
    logs = logs if logs is not None else []
    return GraphedStep(cfg, model, optimizer, EMA(model, cfg.optim.ema_decay), device=CPU, rank=rank,
                       log=logs.append, warn=logs.append)


# ---- finding 2 and 3: every capture warms up on a side stream and is captured on that same stream ----------------

def assert_captured_on_the_warmed_up_stream(fake: FakeCuda, warmup: int) -> None:
    assert fake.captures, "nothing was captured"
    for cap in fake.captures:
        assert cap["capture_error_mode"] == "thread_local", cap  # DALI's and the pin-memory thread's CUDA calls
        side = cap["stream"]
        assert side is not None, "torch.cuda.graph(...) without stream=: captured on a stream of its own, so " \
                                 "per-stream library state (cuBLAS workspaces, cuSOLVER handles) is new in the capture"
        begin = next(i for i, e in enumerate(fake.events) if i >= cap["first_event"] and e[0] == "capture_begin")
        end = next(i for i, e in enumerate(fake.events) if i > begin and e[0] == "capture_end")
        warm = fake.calls_on(0, begin)[-warmup:]
        assert len(warm) == warmup and all(s is side for s in warm), f"warm-up ran on {warm}, capture on {side}"
        assert fake.calls_on(begin, end) and all(s is side for s in fake.calls_on(begin, end))
        # The side stream first waits for the caller's (the static inputs were written there) ...
        waits = [i for i, e in enumerate(fake.events) if e[0] == "wait"]
        assert any(fake.events[i][1:] == (side, fake.default) for i in waits if i < begin)
        # ... and after the capture and its first replay the caller's stream waits for the side stream.
        first_replay = next(i for i, e in enumerate(fake.events) if i > end and e[0] == "replay")
        assert any(fake.events[i][1:] == (fake.default, side) for i in waits if i > first_replay)


def test_the_graphed_step_warms_up_and_captures_on_one_side_stream_in_thread_local_mode(monkeypatch):
    fake = FakeCuda(monkeypatch)
    cfg = debug_cfg()
    model = trained_like(cfg)
    fake.watch(model, "forward", monkeypatch)
    logs: list[str] = []
    step = graphed_step(cfg, model, torch.optim.Adamax(model.parameters(), lr=1e-3), logs)
    for i in range(2):
        step(images(cfg, i), None, step=i)
    assert step.mode == "graphed", logs
    assert len(fake.captures) == 1
    assert_captured_on_the_warmed_up_stream(fake, GraphedStep.warmup_passes)
    # Later replays run on the caller's stream, in order with the input copies before and the reads after them.
    assert [e[1] for e in fake.events if e[0] == "replay"][1:] == [fake.default] * 2


def test_graphed_decoding_warms_up_and_captures_on_one_side_stream_in_thread_local_mode(monkeypatch):
    fake = FakeCuda(monkeypatch)
    model = trained_like(debug_cfg()).eval().requires_grad_(False)
    fake.watch(model, "decode_noise", monkeypatch)
    fake.watch(model, "decode", monkeypatch)
    logs: list[str] = []
    decoder = Decoder(model, "graphed", log=logs.append)
    decoder.mode = "graphed"  # resolve_mode says eager on a CPU; the stand-ins make the capture path run here
    decoder.sample(4, 0.7, seed=0)
    decoder.decode(model.encode(torch.rand(4, 1, 8, 8) - 0.5), batch_size=4)
    assert decoder.mode == "graphed" and len(fake.captures) == 2, logs
    assert_captured_on_the_warmed_up_stream(fake, Decoder.warmup_passes)


# ---- finding 1: a decompressing all-reduce never leaves the optimizer an old gradient ----------------------------

def test_graphed_step_hands_the_optimizer_each_steps_gradient_after_a_decompressing_allreduce(monkeypatch):
    """A stand-in graph whose replay writes this step's gradients into the memory the capture allocated (what a real
    replay does), and an optimizer whose synchronize moves p.grad onto new memory (Horovod's fp16 decompression):
    the graphed step must hand step() the same gradients as the eager step, every step."""
    fake = FakeCuda(monkeypatch)
    cfg = debug_cfg()
    eager_model, graphed_model = trained_like(cfg), trained_like(cfg)
    eager_opt = DecompressingAdamax(eager_model.parameters(), lr=1e-3)
    graphed_opt = DecompressingAdamax(graphed_model.parameters(), lr=1e-3)
    eager = EagerStep(cfg, eager_model, eager_opt, EMA(eager_model, cfg.optim.ema_decay), device=CPU)
    logs: list[str] = []
    graphed = graphed_step(cfg, graphed_model, graphed_opt, logs)
    params = [p for p in graphed_model.parameters() if p.requires_grad]
    buffers: list[torch.Tensor] = []

    def capture_end(graph) -> None:  # the gradients the capture's backward allocated: the graph's own memory
        buffers[:] = [pin(p.grad) for p in params]

    def replay(graph) -> None:
        loss, bpd = graphed._loss(graphed.static_x, graphed.static_y)
        loss = loss * graphed.static_factor
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for buffer, g in zip(buffers, grads, strict=True):
                buffer.copy_(g)
            if hasattr(graphed, "static_loss"):  # the outputs are named once the capture's check has passed
                graphed.static_loss.detach().copy_(loss)
                graphed.static_bpd.detach().copy_(bpd)

    fake.on_capture_end, fake.on_replay = capture_end, replay
    for i in range(4):
        bpd_e, _ = eager(images(cfg, i), None, step=i)
        bpd_g, _ = graphed(images(cfg, i), None, step=i)
        assert float(bpd_g) == pytest.approx(float(bpd_e), rel=1e-5)
    assert graphed.mode == "graphed", logs
    for i, (want, got) in enumerate(zip(eager_opt.handed, graphed_opt.handed, strict=True)):
        for g_e, g_g in zip(want, got, strict=True):
            torch.testing.assert_close(g_g, g_e, rtol=1e-5, atol=1e-7, msg=lambda m, i=i: f"step {i}: {m}")
    for p_e, p_g in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(p_g, p_e, rtol=1e-5, atol=1e-6)


# ---- finding 5: fallbacks log the rank, record the mode, free the buffers; NaN batches; labels on the device ------

def test_a_failed_capture_falls_back_logs_its_rank_records_why_and_frees_the_buffers(monkeypatch):
    fake = FakeCuda(monkeypatch)
    fake.fail_capture = RuntimeError("operation not permitted when stream is capturing")
    cfg = debug_cfg()
    model = trained_like(cfg)
    logs: list[str] = []
    step = graphed_step(cfg, model, torch.optim.Adamax(model.parameters(), lr=1e-3), logs, rank=3)
    bpd, result = step(images(cfg, 0), None, step=0)
    assert torch.isfinite(bpd) and not result.skipped
    assert step.mode == "eager"
    assert len(logs) == 1 and logs[0].startswith("[step] rank 3: runtime.step_mode=graphed: running eager, because "
                                                 "the CUDA graph capture failed: RuntimeError: operation not")
    assert step.run_tags() == {"runtime.step_mode": "eager", "runtime.step_mode.fallbacks":
                               "rank 0: the CUDA graph capture failed: RuntimeError: operation not permitted when "
                               "stream is capturing"}  # one process: it is rank 0 of a world of one
    assert step.graph is None and not any(hasattr(step, k) for k in ("static_x", "static_grads", "params"))
    step(images(cfg, 1), None, step=1)
    assert len(fake.captures) == 1 and len(logs) == 1  # eager from then on, without another attempt or line


def test_a_replay_that_differs_from_eager_falls_back(monkeypatch):
    fake = FakeCuda(monkeypatch)
    cfg = debug_cfg()
    model = trained_like(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    fake.on_replay = lambda graph: params[0].grad.add_(1.0)  # a replay that does not reproduce the eager pass
    logs: list[str] = []
    step = graphed_step(cfg, model, torch.optim.Adamax(model.parameters(), lr=1e-3), logs)
    step(images(cfg, 0), None, step=0)
    assert step.mode == "eager" and "the graph's replay differs from the eager pass (output 2" in logs[0], logs
    assert "replay differs" in step.run_tags()["runtime.step_mode.fallbacks"]


def test_the_replay_check_accepts_non_finite_values_where_eager_has_them():
    """One NaN first batch (a NaN loss makes every gradient NaN) must not disable graphs for the whole run."""
    nan = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert first_mismatch([nan, torch.ones(3)], [nan.clone(), torch.ones(3)]) == ""
    assert "output 0" in first_mismatch([nan], [torch.tensor([1.0, 0.0, float("inf"), -2.0])])
    assert "output 0" in first_mismatch([torch.ones(2)], [torch.tensor([1.0, float("nan")])])


class HostReads(TorchDispatchMode):
    """The dtypes of the values copied to the host (`.item()`, `bool(tensor)`): for a device tensor, each one stalls
    the CPU until the device has caught up. (On this CPU the optimizer's step counters are read too: they are host
    tensors on a GPU as well, so those reads cost nothing there.)"""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_the_graphed_step_checks_labels_without_reading_them_on_the_host(monkeypatch):
    FakeCuda(monkeypatch)
    reads, steps = {}, {}
    labels = torch.arange(8) % 10
    for labelled in (False, True):
        cfg = debug_cfg(*(["model.y_condition=true", "model.num_classes=10"] if labelled else []))
        model = trained_like(cfg)
        steps[labelled] = step = graphed_step(cfg, model, torch.optim.Adamax(model.parameters(), lr=1e-3))
        step(images(cfg, 0), labels, step=0)  # the capture
        with HostReads() as mode:
            step(images(cfg, 1), labels, step=1)
        reads[labelled] = [d for d in mode.dtypes if not d.is_floating_point]  # decisions, not counters
    assert reads[True] == reads[False] == [], reads  # no decision read on the host, labels or not
    # Still checked: on the device (a CUDA device-side assert; on a CPU the assert raises at once).
    with pytest.raises(RuntimeError, match="labels must be in 0..9"):
        steps[True](images(steps[True].cfg, 2), torch.full((8,), 10), step=2)


def test_rank_summary_names_each_rank_that_could_not_capture():
    from glow_dist.training.step import rank_summary

    assert rank_summary([("graphed", "")] * 4) == {"runtime.step_mode": "graphed"}
    tags = rank_summary([("eager", ""), ("eager", "capture failed: X"), ("eager", ""), ("eager", "capture failed: X")])
    assert tags == {"runtime.step_mode": "eager", "runtime.step_mode.fallbacks": "rank 1,3: capture failed: X"}
    same = rank_summary([("eager", "CUDA graphs need a CUDA device")] * 2)
    assert same["runtime.step_mode.fallbacks"] == "every rank: CUDA graphs need a CUDA device"
