"""Config: defaults, YAML, dotted overrides, loud errors naming the key and file, YAML round trip."""
from pathlib import Path

import pytest

from glow_dist.config import (
    Config,
    ConfigError,
    architecture_differences,
    choices,
    dump_yaml,
    flatten,
    from_dict,
    load_config,
    save_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "model:\n  levels: 2\n  image_size: 16\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["model.levels=4", "optim.name=adam", "tracking.sample_temperatures=0,0.7",
                             "train.deterministic=true"])
    assert cfg.model.levels == 4 and cfg.model.image_size == 16
    assert cfg.optim.lr == 0.01 and cfg.optim.name == "adam"
    assert cfg.tracking.sample_temperatures == [0.0, 0.7]
    assert cfg.train.deterministic is True
    assert cfg.model.steps == Config().model.steps  # untouched default


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  levles: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'model\.levles'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'modle\.levels'"):
        load_config(None, ["modle.levels=2"])
    with pytest.raises(ConfigError, match=r"override 'train.stepz=2': unknown key 'train.stepz'"):
        load_config(None, ["train.stepz=2"])


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  levels: three\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'model\.levels' must be int, got 'three'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'model\.learn_top' must be bool"):
        load_config(None, ["model.learn_top=maybe"])
    with pytest.raises(ConfigError, match=r"'model\.levels' must be int, got True"):
        load_config(None, ["model.levels=true"])
    with pytest.raises(ConfigError, match=r"'model\.coupling' must be one of additive, affine"):
        load_config(None, ["model.coupling=spline"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divisible by 2\\*\\*model.levels"):
        load_config(None, ["model.image_size=12", "model.levels=3"])
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(None, ["model.y_condition=true"])
    with pytest.raises(ConfigError, match="train.log_every must be at least 1"):
        load_config(None, ["train.log_every=0"])
    with pytest.raises(ConfigError, match="train.eval_every must be >= 0"):
        load_config(None, ["train.eval_every=-5"])
    with pytest.raises(ConfigError, match="dist.background_priority.*auto, low, normal"):
        load_config(None, ["dist.background_priority=high"])
    assert load_config(None, ["train.eval_every=0"]).train.eval_every == 0  # 0: only at the end
    with pytest.raises(ConfigError, match="dist.hang_timeout must be >= 0 seconds"):
        load_config(None, ["dist.hang_timeout=-1"])
    assert load_config(None, ["dist.hang_timeout=300"]).dist.hang_timeout == 300.0


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="unknown key 'model'"):
        load_config(write(tmp_path, "model: 3\n"))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "debug.yaml", ["model.coupling=additive", "optim.lr=2e-4"])
    save_config(cfg, tmp_path / "out" / "resolved.yaml")
    again = load_config(tmp_path / "out" / "resolved.yaml")
    assert again == cfg
    assert from_dict(__import__("yaml").safe_load(dump_yaml(cfg))) == cfg
    flat = flatten(cfg)
    assert flat["model.coupling"] == "additive" and flat["optim.lr"] == 2e-4


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_old_spellings_of_keys_whose_type_changed_still_load(tmp_path):
    """Configs written before a key changed type (bool -> choice) keep their meaning, in YAML and on the CLI."""
    old = write(tmp_path, "model:\n  channels_last: true\ntrain:\n  tf32: false\ntracking:\n  log_checkpoints: true\n")
    cfg = load_config(old)
    assert (cfg.runtime.channels_last, cfg.runtime.tf32, cfg.tracking.log_checkpoints) == ("true", "false", "all")
    cfg = load_config(None, ["model.channels_last=off", "train.tf32=AUTO", "tracking.log_checkpoints=no"])
    assert (cfg.runtime.channels_last, cfg.runtime.tf32, cfg.tracking.log_checkpoints) == ("false", "auto", "none")
    cfg = load_config(None, ["runtime.channels_last=on"])
    assert cfg.runtime.channels_last == "true"


def test_moved_keys_still_load_at_their_new_place(tmp_path):
    """Speed-only keys left `model` (and train/tracking) for `runtime`; the class-loss weight went to `optim`.
    Old config files, old overrides and checkpoints' saved configs still load, into the new place."""
    old = write(tmp_path, "model:\n  memory: checkpoint\n  compile: true\n  weight_y: 0.5\n"
                          "train:\n  step_mode: eager\ntracking:\n  sample_mode: compiled\n")
    cfg = load_config(old, ["model.autocast=bf16", "model.invertible_segment=4"])
    assert (cfg.runtime.memory, cfg.runtime.compile, cfg.runtime.step_mode, cfg.runtime.sample_mode,
            cfg.runtime.autocast, cfg.runtime.invertible_segment, cfg.optim.weight_y) == \
        ("checkpoint", True, "eager", "compiled", "bf16", 4, 0.5)
    assert "memory" not in to_dict(cfg)["model"]


def test_every_choice_is_declared_once_and_checked_in_validate():
    """A choice key's options come from its field; validate() refuses a bad value set after loading."""
    assert choices("runtime.step_mode") == ("auto", "eager", "compiled", "graphed")
    assert choices("data.decode") == ("auto", "cpu", "gpu")
    cfg = load_config(None)
    cfg.runtime.sample_mode = "fast"
    with pytest.raises(ConfigError, match="runtime.sample_mode' must be one of auto, eager, compiled, graphed"):
        validate(cfg)
    for bad, key in [("train.stop_exit_code=300", "stop_exit_code"), ("dist.commit_every=0", "commit_every")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_architecture_differences_ignore_everything_but_the_architecture():
    a = load_config(None)
    b = load_config(None, ["runtime.memory=invertible", "runtime.channels_last=true", "runtime.compile=true",
                           "optim.lr=0.5", "train.steps=3"])
    assert architecture_differences(a, b) == []
    c = load_config(None, ["model.width=64"])
    assert architecture_differences(a, c) == ["model.width: checkpoint 512 vs config 64"]
    with pytest.raises(ConfigError, match="log_checkpoints' must be one of none, last, all, every_n"):
        load_config(None, ["tracking.log_checkpoints=sometimes"])


def test_data_on_object_storage_keys():
    cfg = load_config(None, ["data.root=s3://shards/celeba", "data.cache=never", "data.cache_max_gb=2.5"])
    assert (cfg.data.root, cfg.data.cache, cfg.data.cache_max_gb) == ("s3://shards/celeba", "never", 2.5)
    with pytest.raises(ConfigError, match=r"data.cache.*'sometimes'"):
        load_config(None, ["data.cache=sometimes"])
    with pytest.raises(ConfigError, match="data.cache_max_gb must be >= 0"):
        load_config(None, ["data.cache_max_gb=-1"])
    # a password in the URL would be saved with the run: refused, with where credentials go instead
    with pytest.raises(ConfigError, match=r"data.root holds a password.*AWS_ACCESS_KEY_ID"):
        load_config(None, ["data.root=https://alice:hunter2@data-host/celeba"])
