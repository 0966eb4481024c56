"""Backends in worker processes (ryzen_core.workers) and the validator running them: timing and output
the same as in this process, memory that is each worker's own, and failures reported while the rest goes on."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_model
from stevedore import ExtensionManager

from helpers import make_distribution
from ryzen_core import hookimpl
from ryzen_core.backends import TorchBackend
from ryzen_core.config import ModelConfig, RunConfig, ValidateConfig
from ryzen_core.data import train_tokenizer
from ryzen_core.models import Transformer
from ryzen_core.models.build import builtin_config
from ryzen_core.plugins import PluginHost
from ryzen_core.validator import perplexity, validate, validation_markdown
from ryzen_core.workers import (ExportRecipe, InlineWorker, ProcessWorker, TorchRecipe, Variant, WorkerFailed,
                                plan_variants)
from worker_recipes import VOCAB, BrokenRecipe, FailingRecipe, ThreadsRecipe, tiny_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="memory figures read /proc (Linux)")

TINY = ModelConfig(preset="tiny")
BIG = ModelConfig(preset="tiny", d_model=512, n_layers=4, d_ff=2048)


def rows(n: int, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def saved(model: torch.nn.Module, path) -> str:
    save_model(model, str(path))
    return str(path)


def recipe(name: str, weights: str, config: ModelConfig = TINY) -> TorchRecipe:
    return TorchRecipe(name, config.model_dump(mode="json"), VOCAB, weights)


def quick(**overrides) -> ValidateConfig:
    settings = dict(prompt_len=8, new_tokens=4, batch_sizes=[1, 2], warmup=1, repeats=2, max_repeats=2,
                    perplexity_batches=1, worker_timeout_s=120)
    return ValidateConfig(**{**settings, **overrides})


def test_a_worker_generates_and_scores_exactly_what_this_process_does(tmp_path):
    model = tiny_model()
    worker = ProcessWorker(recipe("torch", saved(model, tmp_path / "w.safetensors")), threads=1, timeout_s=120)
    try:
        assert worker.failure is None and worker.ready["threads"] == 1
        prompts = rows(2)[:, :8]
        timing = worker.time_generation(prompts, 5)
        assert torch.equal(timing.output_ids, TorchBackend(model).generate(prompts, 5))
        assert len(timing.decode_step_s) == 4 and timing.ttft_s > 0 and timing.decode_s > 0
        assert worker.perplexity(rows(4), 2, 2) == pytest.approx(perplexity(TorchBackend(model), rows(4), 2, 2),
                                                                 rel=1e-6)
        memory = worker.memory(prompts, 5)
        assert memory["isolation"] == "process" and memory["peak_rss_mib"] >= memory["peak_rss_after_load_mib"] > 0
    finally:
        worker.close()
    assert not worker._process.is_alive()

    pinned = ProcessWorker(ThreadsRecipe(), threads=1, timeout_s=120)
    pinned.close()
    assert pinned.ready["name"] == "threads=1 isolated=1"  # what the backend saw inside its worker


def test_each_worker_counts_its_own_model_so_a_bigger_model_shows_more_memory(tmp_path):
    big = Transformer(builtin_config(BIG, VOCAB))
    big_mib = sum(p.numel() * p.element_size() for p in big.parameters()) / 2**20
    backends = {"small": recipe("small", saved(tiny_model(), tmp_path / "small.safetensors")),
                "big": recipe("big", saved(big, tmp_path / "big.safetensors"), BIG)}
    del big
    report = validate(backends, "small", rows(2), quick(batch_sizes=[1]), rows(2))
    memory = report["batches"][0]["backends"]
    assert {report["workers"][n]["isolation"] for n in backends} == {"process"}
    assert memory["big"]["memory"]["peak_rss_mib"] - memory["small"]["memory"]["peak_rss_mib"] > 0.8 * big_mib
    assert "own peak resident set" in report["method"]["memory"]


def test_a_crashed_raising_or_unloadable_worker_is_reported_and_the_others_are_measured(tmp_path):
    weights = saved(tiny_model(), tmp_path / "w.safetensors")
    # Each failing backend survives its warm-up run and fails in the first timed round.
    backends = {"torch": recipe("torch", weights), "exits": FailingRecipe("exits", "exit", 1),
                "segfaults": FailingRecipe("segfaults", "segv", 1), "raises": FailingRecipe("raises", "raise", 1),
                "broken": BrokenRecipe(),
                "again": recipe("again", weights)}
    report = validate(backends, "torch", rows(2), quick(), rows(2))

    failures = report["failures"]
    assert set(failures) == {"exits", "segfaults", "raises", "broken"}
    assert failures["exits"] == {"stage": "batch size 1",
                                 "reason": "backend 'exits': worker exited with code 1 during time_generation"}
    assert "killed by SIGSEGV during time_generation" in failures["segfaults"]["reason"]
    assert "time_generation raised ValueError: generation failed on purpose" in failures["raises"]["reason"]
    assert failures["broken"]["stage"] == "start" and "cannot load this model" in failures["broken"]["reason"]
    assert report["backends"] == ["torch", "again"]
    for batch in report["batches"]:
        assert list(batch["backends"]) == ["torch", "again"] and list(batch["comparisons"]) == ["again"]
        assert batch["backends"]["again"]["export_fidelity"]["token_agreement"] == 1.0
    markdown = validation_markdown(report)
    assert "- **exits failed** (batch size 1): backend 'exits': worker exited with code 1" in markdown


def test_a_worker_that_stops_answering_is_stopped_after_the_timeout():
    worker = ProcessWorker(FailingRecipe("hangs", "hang", 0), threads=1, timeout_s=120)
    worker.timeout_s = 0.5  # started; now the generation never answers
    with pytest.raises(WorkerFailed, match="no answer to generate within 0.5 s; worker stopped"):
        worker.generate(rows(1)[:, :8], 4)
    assert not worker._process.is_alive()


def test_inline_isolation_builds_recipes_here_and_reports_a_raising_backend(tmp_path):
    backends = {"torch": recipe("torch", saved(tiny_model(), tmp_path / "w.safetensors")),
                "raises": FailingRecipe("raises", "raise", 1), "broken": BrokenRecipe(),
                "live": TorchBackend(tiny_model(), "live")}
    report = validate(backends, "torch", rows(2), quick(isolation="inline"), rows(2))
    assert {w["isolation"] for w in report["workers"].values()} == {"inline"}
    assert report["failures"]["raises"]["reason"] == ("backend 'raises': time_generation raised ValueError: "
                                                      "generation failed on purpose")
    assert report["failures"]["broken"]["stage"] == "start"
    assert report["backends"] == ["torch", "live"]
    assert "rss_growth_mib" in report["batches"][0]["backends"]["live"]["memory"]
    assert "Every backend ran in this one process" in validation_markdown(report)


def test_a_failing_baseline_stops_the_validation_with_one_clear_message(tmp_path):
    from ryzen_core.errors import RyzenError

    backends = {"torch": BrokenRecipe("torch"), "other": recipe("other", saved(tiny_model(), tmp_path / "w.st"))}
    with pytest.raises(RyzenError, match="the baseline backend 'torch'.*cannot load this model"):
        validate(backends, "torch", rows(2), quick(), rows(2))


LOADER = """
from pathlib import Path

from ryzen_core import hookimpl


@hookimpl
def load_backend(path):
    if not (Path(path) / "fake-export.txt").is_file():
        return None
    from ryzen_core.backends import TorchBackend
    from ryzen_core.models import Transformer, TransformerConfig
    from ryzen_core.checkpoint import load_weights

    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=64))
    load_weights(model, Path(path) / "model.safetensors")
    return TorchBackend(model.eval(), "fake-export")
"""


def test_an_export_is_loaded_in_the_worker_by_the_installed_plugins_load_backend(tmp_path, monkeypatch):
    make_distribution(tmp_path, "ryzen-plugin-fake-export", "fakeexport", "fake_export_loader", LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker gets this process's sys.path
    export = tmp_path / "export"
    export.mkdir()
    (export / "fake-export.txt").write_text("ours")
    model = tiny_model(3)
    saved(model, export / "model.safetensors")
    worker = ProcessWorker(ExportRecipe(str(export), ("fakeexport",)), threads=1, timeout_s=120)
    try:
        assert worker.failure is None and worker.name == "fake-export"
        prompts = rows(1)[:, :8]
        assert torch.equal(worker.generate(prompts, 4), TorchBackend(model).generate(prompts, 4))
    finally:
        worker.close()
    elsewhere = ProcessWorker(ExportRecipe(str(tmp_path), ("fakeexport",), name="nothing"), threads=1, timeout_s=120)
    assert "none of the plugins ['fakeexport'] can load the export" in elsewhere.failure


class WrapsGeneration:
    """An on_infer plugin registered by code (as tests do): only this process has it."""

    @hookimpl
    def on_infer(self, generate):
        def wrapped(input_ids, max_new_tokens, **sampling):
            return generate(input_ids, max_new_tokens, **sampling)

        return wrapped


def test_a_run_plan_isolates_what_it_can_and_checks_each_variant_against_its_own_model(tmp_path):
    host = PluginHost()
    host.register(WrapsGeneration(), "wraps")
    config = RunConfig.model_validate({"model": {"preset": "tiny"}})
    baseline = tiny_model(0)
    variants = [Variant("baseline", baseline, []), Variant("optimized", tiny_model(1), ["wraps"]),
                Variant("shared", baseline, [])]
    plan = plan_variants(variants, host, config, SimpleNamespace(vocab_size=VOCAB), tmp_path)

    assert list(plan.backends) == ["torch", "torch-optimized"]  # "shared" is the baseline's model, unwrapped
    assert isinstance(plan.backends["torch"], TorchRecipe)
    optimized = plan.backends["torch-optimized"]
    assert isinstance(optimized, InlineWorker) and "plugin wraps is registered in this process" in optimized.reason
    assert plan.own_fp32 == {"baseline": "torch", "optimized": "torch-optimized-fp32", "shared": "torch"}
    assert isinstance(plan.references["torch-optimized-fp32"], TorchRecipe)

    report = validate(plan.backends, "torch", rows(2), quick(batch_sizes=[1]), rows(2),
                      fidelity_reference=plan.fidelity_reference, reference_backends=plan.references)
    result = report["batches"][0]["backends"]["torch-optimized"]
    assert result["export_fidelity"] == {"reference": "torch-optimized-fp32", "token_agreement": 1.0,
                                         "sequence_agreement": 1.0, "tokens": 4, "sequences": 1}
    assert result["agreement_with_baseline"]["reference"] == "torch"
    assert [report["workers"][n]["isolation"] for n in report["backends"]] == ["process", "inline"]


KEEPS_GENERATION = """
from ryzen_core import hookimpl


@hookimpl
def on_infer(generate):
    return None
"""

WRAPS_GENERATION = """
from ryzen_core import hookimpl


@hookimpl
def on_infer(generate, record):
    record("wrapped", pid=__import__("os").getpid())

    def wrapped(input_ids, max_new_tokens, **sampling):
        return generate(input_ids, max_new_tokens, **sampling)

    return wrapped
"""


def test_installed_on_infer_plugins_run_in_the_worker_and_count_only_when_they_wrap_generation(tmp_path, monkeypatch):
    make_distribution(tmp_path, "ryzen-plugin-keeps", "keeps", "keeps_generation", KEEPS_GENERATION)
    make_distribution(tmp_path, "ryzen-plugin-wraps", "wraps", "wraps_generation", WRAPS_GENERATION)
    monkeypatch.syspath_prepend(str(tmp_path))
    # stevedore lists a group once per process; an earlier test's listing would hide these two.
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    host = PluginHost()
    host.load_installed(["keeps", "wraps"])
    config = RunConfig.model_validate({"model": {"preset": "tiny"}})
    model = tiny_model()
    variants = [Variant("baseline", model, []), Variant("kept", model, ["keeps"]), Variant("wrapped", model, ["wraps"])]
    # What on_infer is handed: a real tokenizer (saved for the worker) for a model of VOCAB tokens.
    tokenizer = SimpleNamespace(vocab_size=VOCAB, save=train_tokenizer(["def f(x): return x"] * 8, 300, tmp_path).save)
    plan = plan_variants(variants, host, config, tokenizer, tmp_path)
    assert list(plan.backends) == ["torch", "torch-wrapped"]  # "kept": the baseline's model, generation unchanged
    assert plan.own_fp32 == {"baseline": "torch", "kept": "torch", "wrapped": "torch"} and not plan.references

    report = validate(plan.backends, "torch", rows(2), quick(batch_sizes=[1]), rows(2),
                      fidelity_reference=plan.fidelity_reference, reference_backends=plan.references)
    (event,) = report["workers"]["torch-wrapped"]["plugin_events"]
    assert event["plugin"] == "wraps" and event["event"] == "wrapped" and event["data"]["pid"] != os.getpid()
    assert report["batches"][0]["backends"]["torch-wrapped"]["export_fidelity"]["token_agreement"] == 1.0


NEGATES_MLP = """
import torch
from ryzen_core import Plugin, hookimpl


class Negated(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return -self.inner(x)


class NegatesMlp(Plugin):
    reapply_on_load = True

    @hookimpl
    def on_model_load(self, model, record):
        model.blocks[0].mlp = Negated(model.blocks[0].mlp)
        record("negated")
"""


def test_a_rebuilt_variant_gets_the_layers_its_reapplied_on_model_load_swapped_in(tmp_path, monkeypatch):
    make_distribution(tmp_path, "ryzen-plugin-negates", "negates", "negates_mlp", NEGATES_MLP, "NegatesMlp")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    host = PluginHost()
    host.load_installed(["negates"])
    config = RunConfig.model_validate({"model": {"preset": "tiny"}, "output": {"dir": str(tmp_path / "run")}})
    host.begin_variant(SimpleNamespace(variant="optimized"), ["negates"])
    trained = tiny_model(1)
    host.call_each("on_model_load", ["negates"], model=trained)  # as the trainer did
    tokenizer = SimpleNamespace(vocab_size=VOCAB, save=train_tokenizer(["def f(x): return x"] * 8, 300, tmp_path).save)
    plan = plan_variants([Variant("baseline", tiny_model(0), []), Variant("optimized", trained, ["negates"])],
                         host, config, tokenizer, tmp_path)

    recipe = plan.backends["torch-optimized"]
    assert isinstance(recipe, TorchRecipe) and recipe.load_plugins == ("negates",)
    rebuilt = recipe.build().model  # the saved weights' keys (blocks.0.mlp.inner.*) load only into the swapped model
    assert type(rebuilt.blocks[0].mlp).__name__ == "Negated"
    prompt = rows(1)[:, :8]
    assert torch.equal(rebuilt(prompt).logits, trained(prompt).logits)
