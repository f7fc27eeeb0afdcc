"""What a run page says about a run: standard MLflow tags, params that matter, the name, the description.

Everything here is computed on rank 0 when a run starts (or is resumed) and handed to the Tracker; nothing here
calls MLflow (glow_dist/tracking/client.py does). The tag names are MLflow's own (mlflow/utils/mlflow_tags.py), so
the UI fills "Created by", "Source" and "Git commit" and shows the description on the run's overview.
"""
from __future__ import annotations

import getpass
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glow_dist.config import Config, flatten
from glow_dist.model import parameter_count

# Config keys that change how a run is displayed or where it is stored, not what it computes.
UI_ONLY_KEYS = ("train.progress", "tracking.uri", "tracking.local_dir", "tracking.experiment", "tracking.run_name")
DESCRIPTION_RESULT_MARK = "<!-- glow-dist:results -->"   # evaluate replaces what follows it


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, str]:
    """Commit, branch, dirty flag ("true" when tracked files differ from the commit) of this package's checkout."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "",
            "dirty": "unknown" if status is None else str(bool(status)).lower()}


def command_line() -> str:
    """This process's command, as a user would type it (`glow-dist train ...`, not the venv's full path)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("glow-dist", "__main__.py"):
        argv[0] = "glow-dist"
    return " ".join(shlex.quote(a) for a in argv)


def config_name(cfg: Config) -> str:
    """The stem of `--config FILE` on the command line (digits for configs/digits.yaml), else the data folder's."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return Path(cfg.data.root).name or "glow"


def default_run_name(cfg: Config, world_size: int, cuda: bool, now: datetime | None = None) -> str:
    """`tracking.run_name`, else <config>-<N>gpu|ranks-<UTC time>: repeated runs and world sizes stay apart."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    now = now or datetime.now(timezone.utc)
    return f"{config_name(cfg)}-{world_size}{'gpu' if cuda else 'ranks'}-{now:%Y%m%d-%H%M%S}"


def git_tags() -> dict[str, str]:
    """The checkout's commit, branch and dirty flag as tags: MLflow's own (the UI's Git commit) and ours."""
    git = git_state()
    if not git:
        return {"git_commit": "unknown"}
    return {"mlflow.source.git.commit": git["commit"], "mlflow.source.git.branch": git["branch"],
            "git_commit": git["commit"], "git_dirty": git["dirty"]}


def source_tags(entry_point: str = "glow-dist train") -> dict[str, str]:
    """MLflow's standard source tags: who ran what from which commit (the UI's Created by / Source / Git commit)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", **git_tags()}


def gpu_type() -> str:
    """Name of this rank's GPU, or "cpu" without CUDA."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _dali_version() -> str:
    # DALI ships as nvidia-dali-cudaXXX; read the installed one without importing it (slow, may need a GPU).
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return "not installed"


def environment_params() -> dict[str, str]:
    """Versions a reviewer needs to reproduce a number: Python, torch, CUDA, cuDNN, Horovod, DALI, MLflow."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"env.python": platform.python_version(), "env.torch": torch.__version__,
            "env.cuda": torch.version.cuda or "none (CPU build)", "env.cudnn": str(cudnn) if cudnn else "none",
            "env.horovod": _version("horovod"), "env.dali": _dali_version(), "env.mlflow": _version("mlflow",
                                                                                                   "mlflow-skinny")}


def hardware_params(world_size: int, hosts: int | None = None) -> dict[str, str]:
    """GPU model and count (one per rank), or the CPU model when there is no GPU."""
    import torch

    params = {"hw.hosts": str(hosts)} if hosts is not None else {}
    if torch.cuda.is_available():
        return {**params, "hw.gpu": torch.cuda.get_device_name(), "hw.gpu_count": str(world_size)}
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {**params, "hw.gpu": "none", "hw.gpu_count": "0", "hw.cpu": cpu}


def read_manifest_or_none(root: str | Path) -> dict | None:
    try:
        from glow_dist.data.manifest import read_manifest

        return read_manifest(root)
    except (ValueError, OSError):
        return None


def split_count(manifest: dict, split: str) -> int:
    return int(manifest["splits"].get(split, {}).get("num_samples", 0))


def run_params(cfg: Config, world_size: int, hosts: int | None = None) -> dict[str, Any]:
    """The config without UI-only keys and empty values, plus world/batch sizes, model and data sizes, versions
    and hardware."""
    params: dict[str, Any] = {k: v for k, v in flatten(cfg).items()
                              if k not in UI_ONLY_KEYS and v not in ("", None, [])}
    params.update({"world_size": world_size, "global_batch_size": world_size * cfg.train.batch_size,
                   "model.parameters": parameter_count(cfg.model)})
    manifest = read_manifest_or_none(cfg.data.root)
    if manifest is not None:
        params.update({"data.train_images": split_count(manifest, "train"),
                       "data.test_images": split_count(manifest, "test")})
    return {**params, **environment_params(), **hardware_params(world_size, hosts)}


def description(cfg: Config, world_size: int, manifest: dict | None, run_id: str | None, command: str) -> str:
    """The run's markdown description (mlflow.note.content): what was trained, and how to resume and sample it."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    params = parameter_count(m)
    data = f"`{cfg.data.root}`"
    if manifest is not None:
        data += f": {split_count(manifest, 'train'):,} train / {split_count(manifest, 'test'):,} test images"
    launch = command if world_size == 1 or command.startswith("horovodrun") else \
        f"horovodrun -np {world_size} -H ... {command}"
    model_uri = f"runs:/{run_id}/model" if run_id else "runs:/RUN_ID/model"
    return "\n".join([
        f"**Glow** on {m.image_size}x{m.image_size}x{m.channels} images, {m.n_bits} bits: L={m.levels}, "
        f"K={m.steps}, width {m.width}, {m.coupling} coupling, {m.invconv} 1x1 convs, {params:,} parameters.",
        "",
        f"- data {data}",
        f"- {world_size} rank(s) x batch {t.batch_size} = {world_size * t.batch_size} global; {o.name} lr {o.lr:g} "
        f"({o.lr_scaling} scaling, {o.warmup_steps} warm-up steps); {t.steps:,} steps; EMA decay {o.ema_decay:g}",
        "- metrics: `bits_per_dim/train` (raw weights, training batches), `bits_per_dim/test_ema` and "
        "`bits_per_dim/test_raw` (whole test split), `bits_per_dim/evaluate` (`glow-dist evaluate`)",
        "- samples: one image per temperature (`samples/T...`), same prior draws at every step",
        "",
        f"**Resume** (continues this run from the newest checkpoint in `{t.run_dir}`):",
        f"```\n{launch}\n```",
        "**Sample** from the final EMA weights (the logged model, or the local checkpoints):",
        f"```\nglow-dist sample --model {model_uri} --n 16 --temperature 0.7 --out grid.png\n"
        f"glow-dist sample --checkpoint {t.run_dir} --n 16 --temperature 0,0.7,1 --out rows.png\n```",
        "",
        DESCRIPTION_RESULT_MARK,
    ])


def with_results(note: str, lines: list[str]) -> str:
    """`note` with its results section (after DESCRIPTION_RESULT_MARK) replaced by `lines` (markdown bullets)."""
    head = note.split(DESCRIPTION_RESULT_MARK)[0].rstrip()
    return "\n".join([head, "", DESCRIPTION_RESULT_MARK, "**Results**", "", *lines])


def with_evaluation(note: str, line: str) -> str:
    """`note` with `line` (a `glow-dist evaluate` result) in its results section, replacing an earlier one."""
    results = note.partition(DESCRIPTION_RESULT_MARK)[2]
    kept = [x for x in results.splitlines() if x.startswith("- ") and not x.startswith("- `glow-dist evaluate`")]
    return with_results(note, [*kept, line])
