"""The training-step component (glow_dist/training/step.py): every mode takes the eager step's step, fewer operators.

CPU tests use the tiny debug model; `gpu` tests run only where CUDA is present (conftest skips them elsewhere).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from opcount import OpCounter

from glow_dist.config import Config, load_config
from glow_dist.distributed import gateway as dist
from glow_dist.model import build_model, preprocess
from glow_dist.runtime import resolve_mode, step_capture_blockers
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import LearningRate, make_optimizer
from glow_dist.training.state import TrainingState
from glow_dist.training.step import build_train_step, noise_generator

REPO = Path(__file__).resolve().parents[1]


def debug_cfg(*overrides: str) -> Config:
    return load_config(REPO / "configs/debug.yaml", ["optim.warmup_steps=0", *overrides])


def batch(cfg: Config, n: int = 8, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), generator=g, dtype=torch.uint8)
    return images.to(device), torch.zeros(n, dtype=torch.long, device=device)


class Setup:
    """Model (ActNorm initialized, weights off the identity), optimizer, EMA and the step of one mode."""

    def __init__(self, cfg: Config, device: str = "cpu", seed: int = 0):
        self.logs: list[str] = []
        torch.manual_seed(seed)
        self.model = build_model(cfg.model, cfg.runtime).to(device)
        images, _ = batch(cfg, 16, seed=99, device=device)
        self.model.initialize(preprocess(images, cfg.model.n_bits, generator=noise_generator(
            torch.device(device), 0, -1, 0)))
        with torch.no_grad():  # off the zero init, so coupling and prior gradients are not trivially zero
            g = torch.Generator().manual_seed(seed + 1)
            for p in self.model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
        self.optimizer = make_optimizer(cfg.optim, self.model)
        self.schedule = LearningRate(cfg.optim, world_size=1)
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.faults: set[tuple[int, int]] = set()
        self.step = build_train_step(cfg, self.model, self.optimizer, self.ema, device=torch.device(device),
                                     faults=self.faults, log=self.logs.append)
        self.cfg = cfg

    def run(self, steps: int, device: str = "cpu") -> list[tuple[float, bool]]:
        out = []
        for i in range(steps):
            images, labels = batch(self.cfg, seed=i, device=device)
            self.schedule.apply(self.optimizer, i)
            bpd, result = self.step(images, labels, step=i)
            out.append((float(bpd), result.skipped))
        return out

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.model.parameters()]


def assert_same_training(a: Setup, b: Setup, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for pa, pb in zip(a.ema.model.parameters(), b.ema.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def compiled_and_eager() -> tuple[Setup, Setup, list, list]:
    """One compiled and one eager setup trained 3 steps from the same weights (compiling once for the module)."""
    eager, compiled = Setup(debug_cfg("runtime.step_mode=eager")), Setup(debug_cfg("runtime.step_mode=compiled"))
    assert compiled.step.mode == "compiled" and eager.step.mode == "eager"
    return eager, compiled, eager.run(3), compiled.run(3)


def test_compiled_step_equals_eager(compiled_and_eager):
    eager, compiled, bpd_eager, bpd_compiled = compiled_and_eager
    for (a, skipped_a), (b, skipped_b) in zip(bpd_eager, bpd_compiled, strict=True):
        assert not skipped_a and not skipped_b
        assert a == pytest.approx(b, rel=1e-5)
    for ga, gb in zip(eager.grads(), compiled.grads(), strict=True):  # the last step's (clipped) gradients
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    assert_same_training(eager, compiled)


def test_compiled_step_dispatches_fewer_operators(compiled_and_eager):
    eager, compiled, _, _ = compiled_and_eager
    images, labels = batch(eager.cfg, seed=5)
    counts = {}
    for setup in (eager, compiled):
        with OpCounter() as ops:
            setup.step(images, labels, step=5)
        counts[setup.step.mode] = ops.total + ops.views
    # A count, not a timing: the fused forward/backward and the multi-tensor optimizer leave a fraction of eager's.
    assert counts["compiled"] < 0.5 * counts["eager"], counts


def test_injected_fault_skips_the_step_and_the_ema(compiled_and_eager):
    for setup in compiled_and_eager[:2]:
        before = copy.deepcopy(setup.model.state_dict())
        ema_before = [p.clone() for p in setup.ema.model.parameters()]
        setup.faults.add((7, 0))
        images, labels = batch(setup.cfg, seed=7)
        bpd, result = setup.step(images, labels, step=7)
        assert result.skipped and torch.isfinite(bpd), setup.step.mode  # the loss, not the reported bpd, is NaN
        assert (7, 0) not in setup.faults  # one-shot
        for name, value in setup.model.state_dict().items():
            assert torch.equal(value, before[name]), (setup.step.mode, name)
        assert all(torch.equal(a, b) for a, b in zip(ema_before, setup.ema.model.parameters(), strict=True))
        _, result = setup.step(images, labels, step=8)
        assert not result.skipped


def test_graphed_mode_falls_back_to_eager_on_cpu_with_one_log_line():
    setup = Setup(debug_cfg("runtime.step_mode=graphed"))
    assert setup.step.mode == "eager"
    assert len(setup.logs) == 1 and "CUDA" in setup.logs[0] and "eager" in setup.logs[0], setup.logs
    setup.run(2)
    assert len(setup.logs) == 1


def test_step_mode_resolution():
    def resolve(cfg: Config, device: torch.device) -> tuple[str, str]:
        return resolve_mode(cfg.runtime.step_mode, device, step_capture_blockers(cfg))

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve(debug_cfg(), cpu) == ("eager", "")
    assert resolve(debug_cfg(), cuda) == ("graphed", "")
    # Checkpointing is captured (its segments never touch the RNG state: test_memory.py); the paper configs use it.
    assert resolve(debug_cfg("runtime.memory=checkpoint"), cuda) == ("graphed", "")
    assert resolve(load_config(REPO / "configs/celeba_hq_256.yaml"), cuda) == ("graphed", "")
    for override, words in [("runtime.memory=invertible", "runtime.memory=invertible"),
                            ("dist.elastic=true", "elastic")]:
        mode, reason = resolve(debug_cfg(override), cuda)
        assert mode == "eager" and words in reason
    assert resolve(debug_cfg("runtime.step_mode=compiled"), cpu) == ("compiled", "")


def test_old_boolean_spellings_and_checkpoints_of_either_layout_load():
    assert load_config(None, ["runtime.channels_last=false"]).runtime.channels_last == "false"
    assert load_config(None, ["runtime.channels_last=True"]).runtime.channels_last == "true"
    assert load_config(None, []).runtime.channels_last == "auto"
    with pytest.raises(ValueError, match="runtime.channels_last"):
        load_config(None, ["runtime.channels_last=sometimes"])
    cfg = load_config(REPO / "configs/debug.yaml")
    setup = Setup(cfg)
    saved = TrainingState(cfg, setup.model, setup.optimizer, setup.ema).checkpoint(None, 1)
    # A checkpoint of the old layout: speed-only keys inside `model`, with other values: it resumes.
    saved["config"]["model"].update(memory="invertible", channels_last=True, autocast="none", compile=False)
    TrainingState(cfg, setup.model, setup.optimizer, setup.ema).load(saved, "an old checkpoint")
    other = load_config(REPO / "configs/debug.yaml", ["model.width=8"])
    with pytest.raises(ValueError, match="model.width: checkpoint 16 vs config 8"):
        TrainingState(other, setup.model, setup.optimizer, setup.ema).load(saved, "an old checkpoint")


def test_channels_last_auto_is_nhwc_on_cpu_and_nchw_on_cuda():
    cfg = debug_cfg("runtime.channels_last_min_size=1")
    model = build_model(cfg.model, cfg.runtime)
    x = torch.zeros(1, 4, 4, 4)
    level = model.levels[0]
    assert level.format_for(x) == torch.channels_last
    assert level._formats["cuda"] == torch.contiguous_format
    cfg = debug_cfg("runtime.channels_last=true", "runtime.channels_last_min_size=1")
    forced = build_model(cfg.model, cfg.runtime)
    assert forced.levels[0]._formats["cuda"] == torch.channels_last


def test_gradient_hooks_suspended_is_a_no_op_without_horovod():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dist.gradient_hooks_suspended(opt):
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None


# ---- CUDA only ---------------------------------------------------------------------------------------------------

@pytest.fixture
def deterministic_cuda():
    """fp32 and deterministic cuDNN on both sides of a comparison: TF32, or another algorithm picked by autotuning,
    or a non-deterministic weight gradient would differ at 1e-3 after a few Adamax steps and hide nothing useful."""
    b = torch.backends
    saved = (b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def assert_captured(setup: Setup, mode: str) -> None:
    """The fast path really ran: a silent fallback to eager would pass every comparison."""
    assert setup.step.mode == mode, setup.logs
    assert setup.step.run_tags() == {"runtime.step_mode": mode}, setup.logs
    if mode == "graphed":
        assert sum(line.startswith("[step] graphed: forward + backward captured for batch (8, ")
                   for line in setup.logs) == 1, setup.logs
    assert not any("running eager" in line for line in setup.logs), setup.logs


@pytest.mark.gpu
@pytest.mark.parametrize("mode,overrides", [
    ("compiled", ()), ("graphed", ()),
    ("compiled", ("model.coupling=additive",)), ("graphed", ("model.coupling=additive",)),
    ("compiled", ("runtime.autocast=bf16",)), ("graphed", ("runtime.autocast=bf16",)),
    ("compiled", ("model.y_condition=true", "model.num_classes=10")),
    ("graphed", ("model.y_condition=true", "model.num_classes=10")),
    ("graphed", ("model.invconv=plain",)),                  # slogdet and its backward (cuSOLVER) in the graph
    ("graphed", ("runtime.memory=checkpoint",)),            # the paper configs' memory mode (issue 25, finding 4)
    ("graphed", ("runtime.compile=true",)),                 # Inductor's kernels captured
    ("graphed", ("model.coupling=additive", "runtime.memory=checkpoint", "model.n_bits=5")),  # CelebA-HQ's kind
])
def test_fast_paths_give_the_eager_loss_gradients_and_weights_on_cuda(mode, overrides, deterministic_cuda):
    eager = Setup(debug_cfg("runtime.step_mode=eager", "runtime.tf32=false", *overrides), device="cuda")
    fast = Setup(debug_cfg(f"runtime.step_mode={mode}", "runtime.tf32=false", *overrides), device="cuda")
    bpd_eager, bpd_fast = eager.run(4, device="cuda"), fast.run(4, device="cuda")
    assert_captured(fast, mode)
    # fp32 tolerance; with bf16 couplings Inductor may keep intermediates in fp32 where eager rounds to bf16.
    rtol = 1e-2 if "runtime.autocast=bf16" in overrides else 1e-4
    for (a, _), (b, _) in zip(bpd_eager, bpd_fast, strict=True):
        assert a == pytest.approx(b, rel=rtol / 10)
    for ga, gb in zip(eager.grads(), fast.grads(), strict=True):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=1e-6)
    assert_same_training(eager, fast, rtol=rtol)


@pytest.mark.gpu
def test_graphed_steps_label_check_does_not_wait_for_the_device_on_cuda():
    """No host sync per step for the label check (issue 25): with the GPU busy, checking a batch's labels returns
    before the work queued ahead of it is done (a check that read the labels on the host would wait for it)."""
    setup = Setup(debug_cfg("runtime.step_mode=graphed", "model.y_condition=true", "model.num_classes=10"),
                  device="cuda")
    setup.run(2, device="cuda")
    assert_captured(setup, "graphed")
    _, labels = batch(setup.cfg, seed=3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about a second of GPU time queued ahead
    setup.model.check_labels(labels, sync=False)
    after = torch.cuda.Event()
    after.record()
    assert not after.query(), "the label check waited for the device"
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_graphed_fault_injection_stop_vote_and_checkpoint_interchange_on_cuda(tmp_path):
    graphed = Setup(debug_cfg("runtime.step_mode=graphed"), device="cuda")
    graphed.run(2, device="cuda")
    assert graphed.step.mode == "graphed", graphed.logs
    before = copy.deepcopy(graphed.model.state_dict())
    graphed.faults.add((2, 0))
    images, labels = batch(graphed.cfg, seed=2, device="cuda")
    _, result = graphed.step(images, labels, step=2, stop_requested=True)
    assert result.skipped and result.stop
    assert all(torch.equal(v, before[k]) for k, v in graphed.model.state_dict().items())
    _, result = graphed.step(images, labels, step=3)  # the NaN factor was reset
    assert not result.skipped
    # A checkpoint written under graphed mode resumes under eager with the same next step.
    path = tmp_path / "state.pt"
    torch.save({"model": graphed.model.state_dict(), "optimizer": graphed.optimizer.state_dict(),
                "ema": graphed.ema.state_dict()}, path)
    eager = Setup(debug_cfg("runtime.step_mode=eager"), device="cuda")
    state = torch.load(path, map_location="cuda")
    eager.model.load_state_dict(state["model"])
    eager.optimizer.load_state_dict(state["optimizer"])
    eager.ema.load_state_dict(state["ema"])
    images, labels = batch(graphed.cfg, seed=4, device="cuda")
    bpd_g, _ = graphed.step(images, labels, step=4)
    bpd_e, _ = eager.step(images, labels, step=4)
    assert float(bpd_g) == pytest.approx(float(bpd_e), rel=1e-4)
    assert_same_training(eager, graphed, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_graphed_step_runs_a_different_batch_shape_eagerly_on_cuda():
    setup = Setup(debug_cfg("runtime.step_mode=graphed"), device="cuda")
    setup.run(1, device="cuda")
    images, labels = batch(setup.cfg, n=3, device="cuda")
    bpd, result = setup.step(images, labels, step=1)
    assert torch.isfinite(bpd) and not result.skipped
    assert sum("differs from the captured" in line for line in setup.logs) == 1
    setup.run(2, device="cuda")  # back to replays
    assert setup.step.mode == "graphed"


@pytest.mark.slow
def test_suspended_hooks_grouped_allreduce_compiled_and_graphed_steps_under_horovodrun(tmp_path):
    """Two real Horovod ranks (tests/scripts/step_check.py): gradients left by a backward without all-reduce hooks
    (what a CUDA graph replay leaves) are averaged by the grouped all-reduce and clip_and_step; the compiled step keeps
    every rank's weights identical; the graphed step (stand-in graph) with fp16 compression trains as the eager one;
    a capture that fails on one rank makes every rank run eager, and each knows why."""
    from helpers import horovodrun

    horovodrun(2, str(REPO / "tests/scripts/step_check.py"), str(tmp_path), timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert not any(torch.equal(a, b) for a, b in zip(ranks[0]["local"], ranks[1]["local"], strict=True)
                   if a.abs().sum() > 0), "the ranks' local gradients should differ"
    for i, (a, b) in enumerate(zip(ranks[0]["local"], ranks[1]["local"], strict=True)):
        mean = (a + b) / 2
        for r in ranks:
            torch.testing.assert_close(r["reduced"][i], mean, rtol=1e-5, atol=1e-7)
    for r in ranks:
        assert r["mode"] == "compiled" and not r["skipped"]
    assert ranks[0]["bpds"] != ranks[1]["bpds"]  # different data per rank ...
    for key in ("model", "ema"):  # ... and yet the same weights everywhere
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), (key, name)
    # fp16 all-reduce: the graphed step (4 replays) takes the eager step's steps, and every rank the same.
    for r in ranks:
        assert r["fp16_graphed"]["mode"] == "graphed" and r["fp16_graphed"]["replays"] == 5  # 1 in the capture
        for name, value in r["fp16_eager"]["model"].items():
            torch.testing.assert_close(r["fp16_graphed"]["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in ranks[0]["fp16_graphed"]["model"].items():
        assert torch.equal(value, ranks[1]["fp16_graphed"]["model"][name]), name
    # Rank 1's capture failed: both run eager, with the same record, and each rank's log line names its rank.
    want = {"runtime.step_mode": "eager", "runtime.step_mode.fallbacks": "rank 1: the CUDA graph capture failed: "
            "RuntimeError: operation not permitted when stream is capturing"}
    for r, dump in enumerate(ranks):
        assert dump["agreement"]["mode"] == "eager" and dump["agreement"]["tags"] == want
        assert any(line.startswith(f"[step] rank {r}: runtime.step_mode=graphed: running eager, because ")
                   for line in dump["agreement"]["logs"]), dump["agreement"]["logs"]
    for name, value in ranks[0]["agreement"]["model"].items():
        assert torch.equal(value, ranks[1]["agreement"]["model"][name]), name
