"""train/config.py: typed presets, overrides, and errors that name the offending key."""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import (Config, ConfigError, ConfigTypeError, config_from_dict, load_config,  # noqa: E402
                          parse_cli)

PRESETS = sorted((ROOT / "train" / "configs").glob("*.yaml"))
TINY = str(ROOT / "train" / "configs" / "tiny-cpu.yaml")


def test_presets_load():
    names = {p.name for p in PRESETS}
    assert {"tiny-cpu.yaml", "smollm2-135m-cpu.yaml", "zephyr-7b.yaml", "qwen2.5-3b.yaml"} <= names
    for p in PRESETS:
        cfg = load_config(str(p))
        assert isinstance(cfg, Config)
        assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("name", ["zephyr-7b.yaml", "qwen2.5-3b.yaml"])
def test_model_presets_give_the_gap_test_at_least_512_heldout_prompts(name):
    # The gap-adaptive α's classifier test runs on the held-out split (docs/math.md#alpha-schedule).
    cfg = load_config(str(ROOT / "train" / "configs" / name))
    assert cfg.loss.name == "iris" and cfg.loss.alpha_schedule in ("adaptive", "gap_adaptive")
    assert cfg.data.eval is not None and cfg.data.max_eval_prompts >= 512


def test_defaults_are_safe_and_follow_spin():
    cfg = Config()
    assert cfg.model.trust_remote_code is False
    assert cfg.optim.optimizer == "rmsprop" and cfg.optim.warmup_ratio == 0.1
    assert cfg.loss.name == "iris" and cfg.loss.alpha_schedule == "adaptive" and cfg.loss.scope == "global"


def test_overrides_are_typed_yaml_values(tmp_path):
    cfg, out = parse_cli(["--config", TINY, "--output_dir", str(tmp_path), "--train.iterations", "5",
                          "--optim.lr=2e-5", "--loss.options", "{variant: hinge}", "--eval.at_start", "false",
                          "--data.max_eval_prompts", "null"])
    assert out == str(tmp_path)
    assert cfg.train.iterations == 5
    assert cfg.optim.lr == pytest.approx(2e-5)  # "2e-5" is a YAML 1.1 string; float keys accept it
    assert cfg.loss.options == {"variant": "hinge"}
    assert cfg.eval.at_start is False and cfg.data.max_eval_prompts is None


@pytest.mark.parametrize("override, key", [
    ({"train.iteratoins": 3}, "train.iteratoins"),
    ({"optimizer.lr": 1.0}, "optimizer.lr"),
    ({"bogus": 1}, "bogus"),
    ({"model.tokenzier": "x"}, "model.tokenzier"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(TINY, override)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'train.iterations'"):
        load_config(TINY, {"train.iteratoins": 3})


@pytest.mark.parametrize("override, key", [
    ({"train.iterations": "3"}, "train.iterations"),
    ({"train.iterations": 2.5}, "train.iterations"),
    ({"train.epochs": True}, "train.epochs"),
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"model.use_liger": "yes"}, "model.use_liger"),
    ({"optim.betas": 0.9}, "optim.betas"),
    ({"optim.betas": [0.9, "x"]}, r"optim.betas\[1\]"),
    ({"loss.options": [1]}, "loss.options"),
    ({"generation.temperature": None}, "generation.temperature"),
])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigTypeError, match=f"config key '{key}'"):
        load_config(TINY, override)


def test_type_errors_are_also_type_errors():
    with pytest.raises(TypeError):
        load_config(TINY, {"train.iterations": "3"})


@pytest.mark.parametrize("override, key", [
    ({"loss.name": "ppo"}, "loss.name"),
    ({"loss.scope": "world"}, "loss.scope"),
    ({"train.iterations": 0}, "train.iterations"),
    ({"generation.top_p": 0.0}, "generation.top_p"),
    ({"optim.warmup_ratio": 1.0}, "optim.warmup_ratio"),
    ({"loss.beta": 0.0}, "loss.beta"),
    ({"optim.lr": float("nan")}, "optim.lr"),
    ({"data.max_prompt_length": 4096}, "data.max_prompt_length"),
    ({"train.mixed_precision": "fp8"}, "train.mixed_precision"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, override)


def test_model_source_must_be_exactly_one():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_config(TINY, {"model.name_or_path": "some/model"})
    with pytest.raises(ConfigError, match="model.name_or_path"):
        config_from_dict({"model": {}})


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigTypeError, match="config key 'train'"):
        config_from_dict({"train": 3})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_yaml_is_read_with_safe_load(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=rf"config file {evil}, line 1, column \d+: not valid YAML \(could not "
                                          "determine a constructor"):
        load_config(str(evil))
    assert not marker.exists()


def test_cli_needs_output_dir_and_values():
    with pytest.raises(ConfigError, match="--output_dir"):
        parse_cli(["--config", TINY])
    with pytest.raises(ConfigError, match="--train.iterations needs a value"):
        parse_cli(["--config", TINY, "--output_dir", "x", "--train.iterations"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_cli(["--config", TINY, "--output_dir", "x", "stray"])
