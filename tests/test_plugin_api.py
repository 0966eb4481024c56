"""Plugin API v1: one instance per variant, state through resume, typed results, one calling path."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from ryzen_core import (Adaptation, ExportResult, InferencePath, Plugin, PluginSettings, ReportSection, hookimpl,
                        with_run_config)
from ryzen_core.testing import make_config, make_host, run_tiny, train_tiny


class Counter(Plugin):
    """Counts optimizer steps on the instance; the count must survive a resume and never leak across variants."""

    class Settings(PluginSettings):
        every: int = 1

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        self.steps = 0
        self.resumed_from: int | None = None

    @hookimpl
    def on_train_batch_end(self, step):
        self.steps += 1

    @hookimpl
    def on_train_end(self, record, context):
        record("counted", steps=self.steps, variant=context.variant, instance=id(self), resumed_from=self.resumed_from)
        return ReportSection(f"counted {self.steps} steps")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = self.resumed_from = state["steps"]


Counter.Settings.__name__ = "CounterSettings"


class Other(Plugin):
    @hookimpl
    def on_train_batch_end(self):
        pass


def _events(run_dir, name):
    analysis = json.loads((run_dir / "optimization_analysis.json").read_text())
    return [e for e in analysis["events"] if e["event"] == name]


@pytest.mark.slow
def test_on_train_end_sections_reach_the_report_and_each_variant_gets_its_own_instance(ryzen_cache_dir, tmp_path):
    config = make_config(ryzen_cache_dir, plugins=["counter", "other"], out_dir=tmp_path / "run")
    host = make_host({"counter": Counter, "other": Other}, config)
    run_dir = run_tiny(host, config, ablate=True)
    counted = {e["data"]["variant"]: e["data"] for e in _events(run_dir, "counted")}
    assert set(counted) == {"optimized", "only-counter"}
    # Six steps each: a shared instance would have counted twelve in the second variant.
    assert [counted[v]["steps"] for v in ("optimized", "only-counter")] == [6, 6]
    assert counted["optimized"]["instance"] != counted["only-counter"]["instance"]
    assert "## counter (optimized)\n\ncounted 6 steps" in (run_dir / "report.md").read_text()


def test_resume_restores_each_instance_from_its_state_dict(ryzen_cache_dir, tmp_path):
    first = make_config(ryzen_cache_dir, "train.max_steps=3", plugins=["counter"])
    host = make_host({"counter": Counter}, first)
    train_tiny(host, first, tmp_path / "run")
    state = json.loads(next((tmp_path / "run" / "training_checkpoint").glob("step-*/state.json")).read_text())
    assert state["plugin_state"] == {"counter": {"steps": 3}}
    from ryzen_core import latest_checkpoint, saved_plugin_state

    assert saved_plugin_state(latest_checkpoint(tmp_path / "run")) == {"counter": {"steps": 3}}
    assert saved_plugin_state(tmp_path) == {}  # not a checkpoint

    from ryzen_core import Trainer, load_data

    second = make_config(ryzen_cache_dir, "train.max_steps=6", plugins=["counter"])
    host = make_host({"counter": Counter}, second)
    trainer = Trainer(second, host, ["counter"], tmp_path / "run", load_data(second))
    trainer.fit(resume=True)
    instance = host.instance("counter")
    assert (instance.resumed_from, instance.steps) == (3, 6)


class Adapts(Plugin):
    class Settings(PluginSettings):
        strength: float = 1.0

    @hookimpl
    def on_epoch_end(self, epoch):
        return Adaptation({"strength": self.settings.strength / 2})


class AdaptsBadly(Plugin):
    class Settings(PluginSettings):
        strength: float = 1.0

    @hookimpl
    def on_epoch_end(self):
        return Adaptation({"strength": "much"})


def test_an_adaptation_is_validated_and_applied_by_the_host(ryzen_cache_dir, tmp_path):
    config = make_config(ryzen_cache_dir, plugins=["adapts", "bad"])
    host = make_host({"adapts": Adapts, "bad": AdaptsBadly}, config)
    result = train_tiny(host, config, tmp_path / "run")
    assert host.settings["adapts"].strength == 0.25  # two evaluations in six steps
    assert host.instance("adapts").settings.strength == 0.25
    assert [a["changes"] for a in result.metrics.adaptations] == [{"strength": 0.5}, {"strength": 0.25}]
    assert "does not fit its settings" in result.disabled["bad"]


class WrongExport:
    @hookimpl
    def on_export(self):
        return "model.onnx"


class LegacyExport:
    @hookimpl
    def on_export(self, export_dir):
        return {"exports": {"legacy": str(export_dir)}, "parity": {"max_abs": 0.0}}


def test_results_are_checked_and_legacy_dicts_still_work(tmp_path):
    host = make_host({"wrong": WrongExport(), "legacy": LegacyExport()})
    results = host.call_each("on_export", ["wrong", "legacy"], export_dir=tmp_path)
    assert "plugin wrong: on_export must return ExportResult or None, not str" in host.disabled["wrong"]
    assert results["legacy"] == ExportResult({"legacy": tmp_path}, {}, {"parity": {"max_abs": 0.0}})
    assert results["legacy"].report() == {"exports": {"legacy": str(tmp_path)}, "parity": {"max_abs": 0.0}}


def test_an_inference_path_carries_its_logits_to_the_backend():
    import torch

    from ryzen_core import TorchBackend, Transformer, TransformerConfig

    model = Transformer(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16))
    path = InferencePath(lambda ids, n, **kw: ids, logits=lambda ids: torch.zeros(1, ids.shape[1], 32))
    backend = TorchBackend(model, "t", path)
    ids = torch.tensor([[1, 2, 3]])
    assert backend.generate(ids, 2) is ids
    assert torch.equal(backend.logits(ids), torch.zeros(1, 3, 32))


class First:
    @hookimpl(tryfirst=True)
    def on_model_load(self):
        pass


class Wraps:
    @hookimpl(hookwrapper=True)
    def on_infer(self):
        yield


class NotAPlugin:
    pass


@pytest.mark.parametrize("plugin, message", [
    (First(), "@hookimpl(tryfirst=True) on on_model_load is not supported"),
    (Wraps(), "@hookimpl(hookwrapper=True) on on_infer is not supported"),
    (NotAPlugin, "NotAPlugin is a class but not a ryzen_core.Plugin subclass"),
])
def test_what_ryzen_cannot_honour_is_refused_at_registration(plugin, message):
    from ryzen_core import PluginHost

    host = PluginHost()
    host.register(plugin, "p")
    assert host.records["p"].status == "failed"
    assert message in host.records["p"].error


def test_hooks_reach_the_recorder_in_lifecycle_order_with_the_variant_context(ryzen_cache_dir, tmp_path,
                                                                              hook_recorder):
    config = make_config(ryzen_cache_dir, plugins=["rec"])
    host = make_host({"rec": hook_recorder}, config)
    train_tiny(host, config, tmp_path / "run", label="optimized")
    hooks = hook_recorder.hooks()
    assert hooks[:3] == ["on_model_load", "transform_forward", "on_train_start"]
    assert hooks.count("on_train_batch_end") == 6 and hooks.count("on_epoch_end") == 2
    assert hooks[-1] == "on_train_finalize"
    contexts = {id(kwargs["context"]) for _, kwargs in hook_recorder.calls}
    assert len(contexts) == 1
    context = hook_recorder.calls[0][1]["context"]
    assert (context.variant, context.variant_dir, context.baseline) == ("optimized", tmp_path / "run", None)
    assert context.tokenizer is not None and len(context.data.train) > 0


def test_with_run_config_hands_a_command_the_host_and_a_validated_config(ryzen_cache_dir):
    from ryzen_core.cli import cli

    seen = {}

    @cli.command("api-probe", hidden=True)
    @with_run_config()
    @click.option("--n", type=int, default=1)
    def probe(host, config, n):
        seen.update(host=host, lr=config.train.lr, n=n)

    try:
        runner = CliRunner()
        ok = runner.invoke(cli, ["api-probe", "--set", "train.lr=0.01", "--n", "3"], obj={"host": make_host()})
        assert ok.exit_code == 0, ok.output
        assert (seen["lr"], seen["n"]) == (0.01, 3)
        bad = runner.invoke(cli, ["api-probe", "--set", "train.lr=fast"], obj={"host": make_host()})
        assert bad.exit_code == 2
        assert bad.output.count("\n") == 1 and "train.lr" in bad.output
    finally:
        cli.commands.pop("api-probe")
