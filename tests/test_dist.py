"""glow_dist.distributed.gateway with real Horovod: two ranks under horovodrun (Gloo), one plain process, and no
Horovod at all.

tests/scripts/dist_check.py does the work on every rank; here its outputs are compared with each other and
with a single-process reference that averages the ranks' gradients, clips and steps by hand.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_check.py"
HOROVOD = importlib.util.find_spec("horovod") is not None
needs_horovod = pytest.mark.skipif(not HOROVOD, reason="horovod is not importable here: build it with `make horovod`")


def reference_run(out: dict, data_per_rank: list[list]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process playing every rank: average the ranks' gradients, clip the average, step. (params, norms)"""
    model = torch.nn.Linear(4, 2)
    model.load_state_dict(out["init"])
    optimizer = torch.optim.SGD(model.parameters(), lr=out["lr"], momentum=out["momentum"])
    norms = []
    for step in range(len(data_per_rank[0])):
        per_rank = []
        for data in data_per_rank:
            x, y = data[step]
            model.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            per_rank.append([p.grad.clone() for p in model.parameters()])
        for p, *grads in zip(model.parameters(), *per_rank, strict=True):
            p.grad = torch.stack(grads).mean(0)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), out["max_norm"]).item())
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, norms


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # horovodrun finds python
    return env


def _run(cmd: list[str], outdir: Path, ranks: int) -> list[dict]:
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def _check_ranks(outs: list[dict]) -> None:
    n = len(outs)
    for r, out in enumerate(outs):
        assert (out["rank"], out["size"], out["is_main"], out["host_count"]) == (r, n, r == 0, 1)
        assert (out["local_rank"], out["local_size"]) == (r, n)   # every rank on this one host
        assert out["sum"] == sum(range(1, n + 1))
        assert out["mean"] == pytest.approx([sum(range(n)) / n, 10 * sum(range(n)) / n])
        assert out["scalars"] == pytest.approx({"a": 2 * sum(range(n)) / n, "b": sum(range(n)) / n})
        assert out["object"] == {"from": 0}
        for k, v in outs[0]["init"].items():
            assert torch.equal(out["init"][k], v), f"rank {r}: {k} differs after broadcast_parameters"
            assert torch.equal(out["init_after_opt_broadcast"][k], v), "empty optimizer broadcast changed weights"
        for a, b in zip(out["momentum_after_broadcast"], outs[0]["momentum_after_broadcast"], strict=True):
            assert torch.equal(a, b), f"rank {r}: optimizer state differs after broadcast_optimizer_state"

    # Every rank must hold exactly the parameters of one clipped step on the rank-averaged gradient.
    params, norms = reference_run(outs[0], [out["data"] for out in outs])
    assert max(norms) > outs[0]["max_norm"], "the reference never clips: the test would not notice missing clipping"
    for r, out in enumerate(outs):
        assert out["skipped"] == [False] * 3
        assert out["norms"] == pytest.approx(norms, rel=1e-5)
        for k, v in params.items():
            torch.testing.assert_close(out["after_steps"][k], v, msg=f"rank {r}: {k} differs from the reference")


@pytest.mark.slow
@needs_horovod
def test_two_ranks_under_horovodrun(tmp_path: Path) -> None:
    horovodrun = Path(sys.executable).parent / "horovodrun"
    assert horovodrun.exists(), f"horovod is importable but {horovodrun} is missing"
    cmd = [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(SCRIPT), str(tmp_path)]
    outs = _run(cmd, tmp_path, ranks=2)
    _check_ranks(outs)
    for r, out in enumerate(outs):
        if not torch.cuda.is_available():
            # CPU ranks: Horovod's background and Gloo threads yield to the compute thread (dist.init, "auto").
            nice = out["nice"]
            assert nice["others"].count(19) >= 2 and nice["main"] < 19, f"rank {r}: thread nice values {nice}"
        # Rank 1's NaN (in its gradient, then only in its reported loss) makes both ranks skip, weights untouched.
        assert out["nan_grad_skipped"] and out["nan_loss_skipped"], f"rank {r} did not skip"
        assert out["params_unchanged"] and out["momentum_unchanged"], f"rank {r} changed state on a skipped step"
        assert out["after_skip_skipped"] is False
        for k, v in outs[0]["after_skip"].items():
            assert torch.equal(out["after_skip"][k], v), f"rank {r}: {k} diverged after the skipped steps"


@pytest.mark.slow
@needs_horovod
def test_single_plain_process_with_horovod(tmp_path: Path) -> None:
    """No launcher: hvd.init() must give a world of size 1 and the same helpers must work."""
    _check_ranks(_run([sys.executable, str(SCRIPT), str(tmp_path)], tmp_path, ranks=1))


def test_single_process_without_horovod(tmp_path: Path) -> None:
    """Horovod absent (sys.modules entry None makes its import fail): the size-1 stand-in is used."""
    code = ("import runpy, sys; sys.modules['horovod'] = None; "
            f"sys.argv = ['dist_check.py', {str(tmp_path)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    _check_ranks(_run([sys.executable, "-c", code], tmp_path, ranks=1))
