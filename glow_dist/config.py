"""One config tree of dataclasses, loaded from YAML with dotted command-line overrides.

Resolution order: dataclass defaults, then the YAML file, then `section.key=value` overrides.
An unknown key or a value of the wrong type raises `ConfigError` naming the key and where it came from.

    cfg = load_config("configs/debug.yaml", ["model.levels=2", "optim.lr=3e-4"])
    save_config(cfg, "run/config.yaml")
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the source."""


def choice(default: str, *options: str) -> Any:
    """A string field that takes one of `options` (default first or not); declared here, checked in `validate()`,
    and read by whoever lists the options (`choices("runtime.sample_mode")` for an argparse flag)."""
    if default not in options:
        raise ValueError(f"default {default!r} is not among the choices {options}")
    return field(default=default, metadata={"choices": options})


@dataclass
class ModelConfig:
    """The architecture: what the weights are. Two checkpoints are compatible exactly when these are equal."""
    image_size: int = 32          # H == W of the (square) input images
    channels: int = 3             # 1 grayscale, 3 RGB (the prepared shards' manifest must agree)
    n_bits: int = 8               # bits kept per colour value; n_bins = 2**n_bits
    levels: int = 3               # L
    steps: int = 32               # K flow steps per level
    width: int = 512              # hidden channels of the coupling network
    coupling: str = choice("affine", "additive", "affine")  # additive: y = x + t(x); affine: also a learned scale
    invconv: str = choice("lu", "lu", "plain")  # invertible 1x1 conv: LU-parametrized (fast logdet) or a full matrix
    learn_top: bool = True        # learned mean/log-std of the top prior
    y_condition: bool = False     # class-conditional top prior plus classifier head
    num_classes: int = 0          # required when y_condition is true


@dataclass
class RuntimeConfig:
    """How the model runs: memory, speed and precision choices that never change the weights (a checkpoint resumes,
    samples and decodes under any of them). Each `auto` has one resolver (glow_dist/runtime.py), from a measurement
    on that device kind (docs/gpu.md, BENCHMARKS.md)."""
    # plain | checkpoint (per flow step) | invertible (rebuild inputs with reverse) | auto: plain when `glow-dist
    # plan`'s estimate fits 75% of the device at train.batch_size, else checkpoint (glow_dist/model/memory.py)
    memory: str = choice("plain", "plain", "checkpoint", "invertible", "auto")
    invertible_segment: int = 8   # memory=invertible: steps rebuilt from one stored output (0: a whole level)
    # NHWC activations in the flow (weights stay NCHW); auto: NHWC on CPU (oneDNN, +13%), NCHW on CUDA (-20%, H100)
    channels_last: str = choice("auto", "auto", "true", "false")
    channels_last_min_size: int = 8  # NHWC (channels_last) only in levels whose maps are at least this wide
    # coupling networks in bfloat16; logdet, 1x1 convs, priors in fp32. auto: fp32 everywhere (bf16 slower, H100)
    autocast: str = choice("auto", "auto", "none", "bf16")
    compile: bool = False         # torch.compile every flow step (needs a C++ compiler on CPU; slow first step)
    # the training step (glow_dist/training/step.py); auto: graphed on CUDA, eager on CPU. A mode that cannot run
    # here falls back to eager with one log line
    step_mode: str = choice("auto", "auto", "eager", "compiled", "graphed")
    # how sample grids and decodes run (glow_dist/inference/decoding.py); auto: graphed on CUDA, eager on CPU
    sample_mode: str = choice("auto", "auto", "eager", "compiled", "graphed")
    # TF32 on CUDA; auto: torch's defaults (cuDNN convs TF32, matmuls fp32), as measured on an H100; no effect on CPU
    tf32: str = choice("auto", "auto", "true", "false")


@dataclass
class DataConfig:
    """The prepared shards (`glow-dist prepare`) and how they are read, checked and decoded."""
    root: str = "data/digits"     # folder with train-*.tar / test-*.tar and manifest.json
    backend: str = choice("auto", "auto", "dali", "webdataset")  # auto: dali when importable
    decode: str = choice("auto", "auto", "cpu", "gpu")  # where images are decoded (auto: gpu with dali on CUDA)
    num_workers: int = 1          # decoder threads (dali) or DataLoader workers (webdataset)
    flip: bool = False            # random horizontal flip of training images
    shuffle_buffer: int = 256     # samples held for shuffling the training stream
    # shards against manifest.json (sha256, sample count) and every sample's header, before any rank trains:
    # auto: once per shard per node, remembered by file identity (~/.cache/glow-dist) | always: at every start |
    # never: no sha256 (counts and sizes only; DALI still scans headers). glow_dist/data/verify.py
    verify: str = choice("auto", "auto", "always", "never")
    # bad samples (damaged, wrong size, label out of range) replaced by a substitute before the job stops
    max_bad_samples: int = 10
    # data.root may be s3://bucket/prefix or http(s)://host/path (endpoint AWS_ENDPOINT_URL, credentials the AWS
    # chain). auto: a URL root is copied once per node into data.cache_dir, checked against the manifest's sha256, and
    # read from there | always: a folder root too (a shared filesystem) | never: shards streamed from the URL.
    # glow_dist/data/shard_cache.py
    cache: str = choice("auto", "auto", "always", "never")
    cache_dir: str = ""           # default $XDG_CACHE_HOME/glow-dist/shards/<data set id>; {host}: the hostname
    cache_max_gb: float = 0.0     # bound on the cache folders (whole shards of other data sets evicted); 0: disk


@dataclass
class OptimConfig:
    """The optimizer, its learning-rate schedule and the weights' moving average."""
    name: str = choice("adamax", "adamax", "adam")  # the paper's Adamax, or Adam
    lr: float = 1e-3              # base learning rate, before lr_scaling
    # multiply lr by world size (linear) or its square root (sqrt)
    lr_scaling: str = choice("none", "none", "linear", "sqrt")
    warmup_steps: int = 100       # linear warmup from 0 to the (scaled) lr
    beta1: float = 0.9            # first-moment decay of Adamax/Adam
    beta2: float = 0.999          # second-moment (Adam) or infinity-norm (Adamax) decay
    weight_decay: float = 0.0     # L2 penalty added to the gradient (torch.optim's weight_decay)
    grad_clip: float = 50.0       # max global L2 norm of the gradient; 0 disables clipping
    ema_decay: float = 0.999      # Polyak averaging of weights; 0 disables it
    rollback_lr_factor: float = 0.5  # lr multiplier at each rollback (see train.max_consecutive_skips)
    weight_y: float = 0.01        # model.y_condition: weight of the classifier loss (nats per image, added)


@dataclass
class TrainConfig:
    """The run: batch sizes, its length, what it logs and saves when, where, and how it resumes and stops."""
    batch_size: int = 16          # per rank
    init_batch_size: int = 64     # per rank, for ActNorm data-dependent init
    steps: int = 1000             # total optimizer steps
    log_every: int = 10           # training metrics (averaged over ranks) every N steps
    eval_every: int = 200         # test-set bits/dim every N steps and at the end (0: only at the end)
    sample_every: int = 500       # sample grids every N steps and at the end (0: only at the end)
    checkpoint_every: int = 200   # and at the end, and on SIGTERM (0: only then)
    keep_checkpoints: int = 3     # newest checkpoints kept in <run_dir>/checkpoints; older ones are deleted
    async_checkpoint: bool = True   # write periodic checkpoints in the background (one host copy of the state)
    run_dir: str = "runs/default"  # checkpoints, config.yaml and metrics.jsonl of the run; where resume=auto looks
    resume: str = "auto"          # auto | never | path to a checkpoint
    seed: int = 0                 # initial weights, data order (with the epoch), dequantization noise (with step, rank)
    deterministic: bool = False   # deterministic algorithms and data order, for exact resume
    threads: int = 0              # torch intra-op threads per process; 0 leaves torch's default
    max_eval_batches: int = 0     # 0: evaluate the whole test split
    progress: bool = True         # progress bar on rank 0
    max_consecutive_skips: int = 20   # after this many non-finite steps in a row, roll back; 0 disables rollback
    stop_exit_code: int = 0       # exit status after a signal-initiated stop with its checkpoint (75: launch files)


@dataclass
class DistConfig:
    """Horovod: elastic mode, gradient compression, its threads' priority and the step watchdog."""
    elastic: bool = False         # Horovod elastic mode: launch with horovodrun --host-discovery-script, --min-np
    commit_every: int = 10        # elastic: steps between commits (the state a lost worker rolls the others back to)
    fp16_allreduce: bool = False  # compress gradients to fp16 on the wire
    # Horovod's threads: low (nice 19) | normal | auto (low on CPU ranks)
    background_priority: str = choice("auto", "auto", "low", "normal")
    # seconds with no completed step before every rank ends the job (stacks dumped, exit 69: a peer was lost;
    # glow_dist/distributed/watchdog.py). 0: auto, max(120, 20 x the median step) after 10 steps
    hang_timeout: float = 0.0


@dataclass
class TrackingConfig:
    """MLflow: where runs go, what they are called, and what they record (samples, checkpoints, the model)."""
    uri: str = ""                 # "" : $MLFLOW_TRACKING_URI, else a local sqlite store under tracking.local_dir
    local_dir: str = "mlflow"     # sqlite db and artifacts for the default local store
    experiment: str = "glow-dist"  # MLflow experiment of the run (created if missing)
    run_name: str = ""            # "" : <config>-<N>ranks-<UTC time>, e.g. digits-2ranks-20260101-120000
    sample_temperatures: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 1.0])  # one grid each
    sample_count: int = 16        # images per temperature in each grid
    # which checkpoints MLflow keeps (see glow_dist/tracking/client.py)
    log_checkpoints: str = choice("last", "none", "last", "all", "every_n")
    log_checkpoints_every: int = 0   # every_n: also keep the checkpoints of steps that are multiples of this
    log_model: bool = True        # the final EMA weights as an MLflow model (`models:/` or `runs:/RUN/model`)
    register_as: str = ""         # also register that model under this name in the model registry
    # grids from: best (the weights that scored better at the last evaluation) | ema | raw
    sample_weights: str = choice("best", "best", "ema", "raw")
    system_metrics: bool = True   # MLflow's CPU/memory/GPU sampling for the run (needs psutil; GPUs need pynvml)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def choices(dotted: str) -> tuple[str, ...]:
    """The options of a choice key, e.g. choices("runtime.sample_mode") -> ("auto", "eager", "compiled", "graphed")."""
    section, key = dotted.split(".")
    found = next((f for f in dataclasses.fields(getattr(Config(), section)) if f.name == key), None)
    if found is None or "choices" not in found.metadata:
        raise KeyError(f"{dotted} is not a choice key")
    return found.metadata["choices"]


# Keys that moved to another section: an old config file or checkpoint still loads (the key is read at its new
# place). Speed-only keys left `model` when architecture and runtime were separated.
_MOVED_KEYS = {
    **{f"model.{k}": f"runtime.{k}" for k in ("memory", "invertible_segment", "channels_last",
                                               "channels_last_min_size", "autocast", "compile")},
    "train.step_mode": "runtime.step_mode",
    "train.tf32": "runtime.tf32",
    "tracking.sample_mode": "runtime.sample_mode",
    "model.weight_y": "optim.weight_y",
}

# Keys whose type changed: the old spelling still loads (configs and checkpoints written before the change).
# One table, key -> {old spelling: new value}; strings are matched stripped and lower-cased.
# - tracking.log_checkpoints was a bool: true uploaded every checkpoint (now "all"), false none.
# - runtime.channels_last and runtime.tf32 were bools and now also take "auto": true/false keep their meaning.
_WAS_BOOL_NOW_AUTO = {True: "true", False: "false", "yes": "true", "on": "true", "1": "true",
                      "no": "false", "off": "false", "0": "false"}
_OLD_SPELLINGS: dict[str, dict[bool | str, str]] = {
    "tracking.log_checkpoints": {True: "all", False: "none", "true": "all", "false": "none", "yes": "all",
                                 "no": "none"},
    "runtime.channels_last": _WAS_BOOL_NOW_AUTO,
    "runtime.tf32": _WAS_BOOL_NOW_AUTO,
}


def _new_spelling(dotted: str, value: Any) -> Any:
    """`value` in today's spelling if `dotted` is a key whose type changed; otherwise `value` unchanged."""
    old = _OLD_SPELLINGS.get(dotted)
    if old is None or not isinstance(value, bool | str):
        return value
    if isinstance(value, str):
        value = value.strip().lower()
    return old.get(value, value)


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Return `value` as `typ`, accepting YAML/CLI spellings; raise ConfigError naming key and source."""
    def fail() -> ConfigError:
        name = getattr(typ, "__name__", str(typ))
        return ConfigError(f"{source}: '{key}' must be {name}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(typ)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):  # CLI form: 0,0.5,0.7 or [0,0.5]
            parts = value.strip().strip("[]")
            value = [p for p in (s.strip() for s in parts.split(",")) if p]
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_coerce(v, item_type, key, source) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise fail()
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail()
        if typ is int and isinstance(value, float):
            raise fail()
        try:
            return typ(value)
        except ValueError:
            raise fail() from None
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise fail()


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    dotted = _MOVED_KEYS.get(dotted, dotted)
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"{source}: unknown key '{dotted}'; keys look like section.key with section one of "
            f"{', '.join(sorted(sections))}"
        )
    section = getattr(cfg, parts[0])
    types = _field_types(section)
    if parts[1] not in types:
        raise ConfigError(
            f"{source}: unknown key '{dotted}'; '{parts[0]}' has {', '.join(sorted(types))}"
        )
    coerced = _coerce(_new_spelling(dotted, value), types[parts[1]], dotted, source)
    _check_choice(section, parts[0], parts[1], coerced, source)
    setattr(section, parts[1], coerced)


def _check_choice(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    options = next(f for f in dataclasses.fields(section) if f.name == key).metadata.get("choices")
    if options and value not in options:
        raise ConfigError(f"{source}: '{section_name}.{key}' must be one of {', '.join(options)}, got {value!r}")


def apply_dict(cfg: Config, tree: dict, source: str) -> Config:
    """Apply a nested {section: {key: value}} mapping onto `cfg` in place."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    for section_name, values in tree.items():
        if not isinstance(values, dict):
            _set(cfg, str(section_name), values, source)  # raises: top-level scalars are never valid keys
        for key, value in values.items():
            _set(cfg, f"{section_name}.{key}", value, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if given), then the overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (the configs/ folder has the shipped ones)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        apply_dict(cfg, tree, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"override '{text}'")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every choice key against its declared options, and the checks that a single key's type cannot express."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            _check_choice(values, section.name, f.name, getattr(values, f.name), "config")
    m, t = cfg.model, cfg.train
    if m.levels < 1 or m.steps < 1:
        raise ConfigError("model.levels and model.steps must be at least 1")
    if m.image_size % (2 ** m.levels) != 0:
        raise ConfigError(
            f"model.image_size={m.image_size} must be divisible by 2**model.levels={2 ** m.levels} "
            "(each level squeezes H and W by 2)"
        )
    if not 1 <= m.n_bits <= 8:
        raise ConfigError(f"model.n_bits must be in 1..8, got {m.n_bits}")
    if m.y_condition and m.num_classes < 2:
        raise ConfigError("model.y_condition=true needs model.num_classes >= 2")
    if t.batch_size < 1 or t.init_batch_size < 1:
        raise ConfigError("train.batch_size and train.init_batch_size must be at least 1")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be at least 1, got {t.log_every}")
    for key in ("eval_every", "sample_every", "checkpoint_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0 (0: only at the end), got {getattr(t, key)}")
    if not 0 <= t.stop_exit_code <= 255:
        raise ConfigError(f"train.stop_exit_code must be an exit status 0..255, got {t.stop_exit_code}")
    if cfg.dist.hang_timeout < 0:
        raise ConfigError(f"dist.hang_timeout must be >= 0 seconds (0: auto), got {cfg.dist.hang_timeout}")
    if re.search(r"://[^/@\s]+:[^/@\s]*@", cfg.data.root):
        raise ConfigError("data.root holds a password (scheme://user:password@host); configs are saved with every "
                          "run, so give credentials the AWS way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) "
                          "or in ~/.netrc, and write the URL without them")
    if cfg.data.cache_max_gb < 0:
        raise ConfigError(f"data.cache_max_gb must be >= 0 (0: only the disk's size bounds it), got "
                          f"{cfg.data.cache_max_gb}")
    if cfg.data.max_bad_samples < 0:
        raise ConfigError(f"data.max_bad_samples must be >= 0 (0: stop at the first bad sample), got "
                          f"{cfg.data.max_bad_samples}")
    if cfg.dist.commit_every < 1:
        raise ConfigError(f"dist.commit_every must be at least 1, got {cfg.dist.commit_every}")
    if cfg.tracking.log_checkpoints == "every_n" and cfg.tracking.log_checkpoints_every < 1:
        raise ConfigError("tracking.log_checkpoints=every_n needs tracking.log_checkpoints_every >= 1 (the step "
                          "interval of the checkpoints MLflow keeps)")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")


def architecture_differences(saved: Config, current: Config, names: tuple[str, str] = ("checkpoint", "config"),
                             ) -> list[str]:
    """'model.KEY: checkpoint A vs config B' for each architecture key in which two configs differ; [] when their
    weights are interchangeable (runtime, data, optimizer and tracking choices never are a difference)."""
    a, b = dataclasses.asdict(saved.model), dataclasses.asdict(current.model)
    return [f"model.{k}: {names[0]} {a[k]!r} vs {names[1]} {b[k]!r}" for k in a if a[k] != b[k]]


def tracking_store(tracking: TrackingConfig) -> tuple[str, Path | None]:
    """(tracking URI, the local store's folder or None): `tracking.uri`, else $MLFLOW_TRACKING_URI, else a sqlite
    store in `tracking.local_dir` (MLflow 3 has no default file store; `make mlflow-ui` shows this one). The one
    place that decides where runs go; nothing is created here."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    local = Path(tracking.local_dir).resolve()
    return f"sqlite:///{local / 'mlflow.db'}", local


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict, source: str = "<dict>") -> Config:
    cfg = apply_dict(Config(), tree, source)
    validate(cfg)
    return cfg


def flatten(cfg: Config) -> dict[str, Any]:
    """{'model.levels': 3, ...}: the form logged as MLflow params."""
    return {f"{s}.{k}": v for s, d in to_dict(cfg).items() for k, v in d.items()}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg))
