"""Discovery, registration, hook validation, ordered folding and fallback of plugins."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import make_distribution
from ryzen_core import PluginError, hookimpl
from ryzen_core.plugins import PluginHost, load_plugins

BUNDLED = {"kernel": "ryzen-plugin-kernel-simd", "compression": "ryzen-plugin-semantic-compression",
           "rlvr": "ryzen-plugin-rlvr", "onnx": "ryzen-plugin-onnx-export"}


def test_plugins_json_lists_the_four_bundled_plugins_with_hooks(ryzen):
    result = ryzen("plugins", "--json")
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    for name, dist in BUNDLED.items():
        assert records[name]["distribution"] == dist
        assert records[name]["status"] == "loaded"
        assert records[name]["version"] == "0.1.0"
        assert "ryzen_settings" in records[name]["hooks"]
    assert "transform_forward" in records["kernel"]["hooks"]


def test_broken_plugin_is_listed_and_does_not_stop_other_commands(ryzen, tmp_path):
    make_distribution(tmp_path, "ryzen-plugin-broken", "broken", "ryzen_broken_mod",
                      "raise ImportError('needs libfoo, which is not installed')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    listing = ryzen("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    broken = {r["name"]: r for r in json.loads(listing.stdout)}["broken"]
    assert broken["status"] == "failed"
    assert broken["distribution"] == "ryzen-plugin-broken"
    assert "needs libfoo" in broken["error"]
    shown = ryzen("config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    asked = ryzen("run", "--plugins", "broken", env=env)
    assert asked.returncode == 2
    assert asked.stderr.strip().splitlines() == [
        "Error: plugin 'broken' failed to load: ImportError: needs libfoo, which is not installed"]


def test_unknown_plugin_name_is_a_usage_error(ryzen):
    result = ryzen("run", "--plugins", "kernel,nosuch")
    assert result.returncode == 2
    assert "plugin 'nosuch' is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_var_controls_autoload(monkeypatch):
    monkeypatch.setenv("RYZEN_LOAD_PLUGINS", "")
    assert load_plugins().records == {}
    monkeypatch.setenv("RYZEN_LOAD_PLUGINS", "rlvr")
    assert list(load_plugins().records) == ["rlvr"]
    # A plugin the user selects is loaded even when autoload leaves it out.
    assert set(load_plugins(selected=["kernel"]).records) == {"rlvr", "kernel"}


class Appender:
    """A plugin that appends its name to a trace, to observe the fold order."""

    def __init__(self, name):
        self.name = name

    @hookimpl
    def transform_forward(self, forward):
        def wrapped(x, y):
            return forward(x, y) + [self.name]

        return wrapped


def test_transform_forward_folds_in_the_users_order():
    host = PluginHost()
    for name in "abc":
        host.register(Appender(name), name)
    base = lambda x, y: []  # noqa: E731
    assert host.fold("transform_forward", ["a", "b", "c"], "forward", base, model=None, config=None)(0, 0) == list("abc")
    assert host.fold("transform_forward", ["c", "a"], "forward", base, model=None, config=None)(0, 0) == list("ca")


def test_hook_implementation_may_take_a_subset_of_arguments_and_gets_its_own_settings():
    seen = {}

    class Plugin:
        @hookimpl
        def on_epoch_end(self, epoch, settings):
            seen["args"] = (epoch, settings)

    host = PluginHost()
    host.register(Plugin(), "p")
    host.settings["p"] = "p-settings"
    host.call_each("on_epoch_end", ["p"], epoch=3, metrics={}, model=None, config=None)
    assert seen["args"] == (3, "p-settings")


def test_misspelled_hook_is_an_error_not_a_silent_noop():
    class Typo:
        @hookimpl
        def on_epoch_ned(self, epoch):  # sic
            pass

    host = PluginHost()
    host.register(Typo(), "typo")
    record = host.records["typo"]
    assert record.status == "failed"
    assert "on_epoch_ned" in record.error
    assert host.pm.get_plugin("typo") is None
    with pytest.raises(PluginError, match="plugin 'typo' failed to load"):
        host.require(["typo"])


def test_raising_transform_is_disabled_and_recorded_while_others_continue():
    class Raises:
        @hookimpl
        def transform_forward(self, forward):
            raise RuntimeError("kernel not available")

    host = PluginHost()
    host.register(Raises(), "bad")
    host.register(Appender("good"), "good")
    forward = host.fold("transform_forward", ["bad", "good"], "forward", lambda x, y: [], model=None, config=None)
    assert forward(0, 0) == ["good"]
    assert host.disabled == {"bad": "transform_forward: RuntimeError: kernel not available"}
    assert host.active(["bad", "good"]) == ["good"]
    assert host.events[-1].event == "disabled"


def test_core_does_not_import_plugins():
    code = "import ryzen_core.cli, ryzen_core.run, ryzen_core.trainer, sys; " \
           "print([m for m in sys.modules if m.startswith('ryzen_plugin')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_on_infer_wraps_the_generation_the_validator_times():
    import torch

    from ryzen_core.backends import TorchBackend
    from ryzen_core.models import Transformer, TransformerConfig

    calls = []

    class CountingInfer:
        @hookimpl
        def on_infer(self, generate):
            def counted(input_ids, max_new_tokens, **sampling):
                calls.append(max_new_tokens)
                return generate(input_ids, max_new_tokens, **sampling)

            return counted

    host = PluginHost()
    host.register(CountingInfer(), "counting")
    model = Transformer(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16))
    plain = TorchBackend(model)
    backend = TorchBackend(model, "wrapped", host.fold("on_infer", ["counting"], "generate", plain.plain_generate,
                                                        model=model, tokenizer=None, config=None))
    prompt = torch.randint(0, 32, (1, 4))
    assert torch.equal(backend.generate(prompt, 3), plain.generate(prompt, 3))
    assert calls == [3]


BAD_SETTINGS = """
from ryzen_core import hookimpl

@hookimpl
def ryzen_settings():
    raise RuntimeError("settings need libbar")
"""


def test_a_plugin_whose_settings_raise_fails_only_when_selected(ryzen, tmp_path):
    make_distribution(tmp_path, "ryzen-plugin-badsettings", "badsettings", "ryzen_badsettings_mod", BAD_SETTINGS)
    env = {"PYTHONPATH": str(tmp_path)}
    shown = ryzen("config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    asked = ryzen("config", "show", "--plugins", "badsettings", env=env)
    assert asked.returncode == 2
    assert asked.stderr.strip().splitlines() == [
        "Error: plugin 'badsettings' failed to load: ryzen_settings raised RuntimeError: settings need libbar"]


def test_sys_exit_in_a_hook_disables_the_plugin_instead_of_ending_the_run():
    class Exits:
        @hookimpl
        def on_epoch_end(self, epoch):
            sys.exit(3)

    host = PluginHost()
    host.register(Exits(), "exits")
    host.register(Appender("good"), "good")
    host.call_each("on_epoch_end", ["exits"], epoch=1, metrics={}, model=None, config=None)
    assert host.disabled == {"exits": "on_epoch_end: SystemExit: 3"}
    forward = host.fold("transform_forward", ["exits", "good"], "forward", lambda x, y: [], model=None, config=None)
    assert forward(0, 0) == ["good"]
