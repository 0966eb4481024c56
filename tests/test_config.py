"""Config loading and validation: every mistake is one line naming the key, exit code 2."""
from __future__ import annotations

import json

import pytest
import yaml

from ryzen_core import ConfigError
from ryzen_core.config import load_config, resolve_plugin_settings
from ryzen_plugin_kernel_simd.plugin import KernelSettings


def test_defaults_need_no_file():
    config = load_config()
    assert config.model.preset == "simple" and config.data.source == "stdlib"
    assert config.train.lr > 0 and config.plugins == []


def test_file_then_set_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01, "batch_size": 8}, "model": {"preset": "tiny"}}))
    config = load_config(path, ["train.lr=3e-4", "validate.batch_sizes=[1, 4]", "train.precision=bf16"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.batch_size == 8
    assert config.validate_.batch_sizes == [1, 4]
    assert config.model.preset == "tiny"
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"train": {"max_steps": 7}}))
    assert load_config(json_path).train.max_steps == 7


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.batch_size=0", "train.batch_size: Input should be greater than 0"),
    ("train.bach_size=4", "train.bach_size: unknown key"),
    ("train.precision=fp8", "train.precision: Input should be 'fp32', 'bf16' or 'auto'"),
    ("data.source=/no/such/file.txt", "data.source /no/such/file.txt does not exist"),
    ("model.source=hf", "needs exactly one of model.hf_path or model.hf_config"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match="^config error: ") as info:
        load_config(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_set_syntax_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(overrides=["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_plugin_sections_are_validated_by_the_plugins_own_model():
    config = load_config(overrides=["kernel.attention=math", "kernel.tune_rounds=3"])
    settings = resolve_plugin_settings(config, {"kernel": KernelSettings})
    assert settings["kernel"].attention == "math" and settings["kernel"].tune_rounds == 3
    with pytest.raises(ConfigError, match="kernel.tune_rounds: Input should be greater than or equal to 2"):
        resolve_plugin_settings(load_config(overrides=["kernel.tune_rounds=1"]), {"kernel": KernelSettings})
    with pytest.raises(ConfigError, match="'precision' moved to train.precision"):  # one owner per decision
        resolve_plugin_settings(load_config(overrides=["kernel.precision=fp32"]), {"kernel": KernelSettings})
    with pytest.raises(ConfigError, match="unknown section 'kernal'"):
        resolve_plugin_settings(load_config(overrides=["kernal.threads=2"]), {"kernel": KernelSettings})


def test_plugins_named_twice_is_an_error():
    with pytest.raises(ConfigError, match="'kernel' is named more than once"):
        load_config(plugins=["kernel", "kernel"])


def test_cli_config_errors_exit_2_with_one_line(ryzen, tmp_path):
    for args in (["run", "--set", "train.lr=-1"], ["train", "--set", "data.source=/nope"],
                 ["config", "show", "--set", "kernel.threads=zero"], ["run", "--config", str(tmp_path / "x.yml")]):
        result = ryzen(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr)


def test_config_show_and_schema(ryzen):
    shown = ryzen("config", "show", "--json", "--set", "train.lr=0.005", "--plugins", "kernel")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["train"]["lr"] == 0.005 and data["plugins"] == ["kernel"]
    assert data["kernel"]["attention"] == "auto"  # plugin defaults appear in the effective config
    schema = json.loads(ryzen("config", "schema").stdout)
    assert {"model", "data", "train", "validate", "output", "kernel"} <= set(schema["properties"])
