"""One test named for each hook that no other test is named for: what the hook is promised to do."""
from __future__ import annotations

import click
import torch
from click.testing import CliRunner

from ryzen_core import Plugin, PluginSettings, hookimpl, load_weights, latest_checkpoint
from ryzen_core.testing import make_config, make_host, train_tiny


class Tunable(Plugin):
    class Settings(PluginSettings):
        lr_scale: float = 0.5

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        self.steps: list[int] = []

    @hookimpl
    def on_train_start(self, optimizer):
        for group in optimizer.param_groups:
            group["lr"] *= self.settings.lr_scale

    @hookimpl
    def on_train_batch_end(self, step, metrics):
        self.steps.append((step, metrics["step"]))

    @hookimpl
    def on_train_finalize(self, model):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()


def test_ryzen_settings_sections_are_validated_and_a_raising_one_fails_only_its_plugin(ryzen_cache_dir):
    class Raises:
        @hookimpl
        def ryzen_settings(self):
            raise RuntimeError("no settings today")

    config = make_config(ryzen_cache_dir, "tunable.lr_scale=0.25", plugins=["tunable"])
    host = make_host({"tunable": Tunable, "raises": Raises()}, config)
    assert host.settings["tunable"].lr_scale == 0.25
    assert host.records["raises"].status == "failed" and "no settings today" in host.records["raises"].error


def test_register_commands_adds_a_command_the_cli_runs():
    from ryzen_core.cli import build_cli

    @click.command("hello")
    def hello():
        click.echo("hello from a plugin")

    class Commands:
        @hookimpl
        def register_commands(self, cli):
            cli.add_command(hello)

    host = make_host({"commands": Commands()})
    result = CliRunner().invoke(build_cli(host), ["hello"], obj={"host": host})
    assert (result.exit_code, result.output) == (0, "hello from a plugin\n")


def test_on_train_start_and_on_train_batch_end_see_the_optimizer_and_every_step(ryzen_cache_dir, tmp_path):
    config = make_config(ryzen_cache_dir, "train.warmup_steps=0", "train.min_lr_ratio=1.0", plugins=["tunable"])
    host = make_host({"tunable": Tunable}, config)
    result = train_tiny(host, config, tmp_path / "run")
    assert [row["lr"] for row in result.metrics.steps] == [config.train.lr * 0.5] * 6
    assert host.instance("tunable").steps == [(s, s) for s in range(1, 7)]


def test_on_train_finalize_weights_are_the_ones_checkpointed(ryzen_cache_dir, tmp_path):
    config = make_config(ryzen_cache_dir, plugins=["tunable"])
    host = make_host({"tunable": Tunable}, config)
    result = train_tiny(host, config, tmp_path / "run")
    assert all(float(p.detach().abs().sum()) == 0.0 for p in result.model.parameters())
    from ryzen_core import build_model

    saved = build_model(config.model, config.data.vocab_size)
    load_weights(saved, latest_checkpoint(tmp_path / "run"))
    assert all(float(p.detach().abs().sum()) == 0.0 for p in saved.parameters())


def test_a_hook_that_hangs_is_disabled_when_it_passes_the_time_limit(ryzen_cache_dir, tmp_path):
    import time

    class Hangs:
        @hookimpl
        def on_model_load(self):
            time.sleep(3600)

    config = make_config(ryzen_cache_dir, "train.hook_timeout_s=0.5", plugins=["hangs"])
    host = make_host({"hangs": Hangs()}, config)
    result = train_tiny(host, config, tmp_path / "run")
    assert result.disabled["hangs"] == "on_model_load: ryzen_core.errors.PluginError: plugin hangs: on_model_load ran " \
                                       "past train.hook_timeout_s (0.5 s)"
    assert result.metrics.steps[-1]["step"] == 6  # and the run went on without it
