"""The plugin through its hooks: settings, the training forward, adaptation and its state per variant,
typed results, and `ryzen run`/`embed`/`search`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ryzen_core import (Adaptation, ConfigError, InferencePath, RunContext, Transformer, TransformerConfig,
                        last_hidden, lm_logits, load_config, reference_forward)
from ryzen_core.testing import make_host
from ryzen_plugin_semantic_compression import cli
from ryzen_plugin_semantic_compression.matryoshka import truncated_logits
from ryzen_plugin_semantic_compression.plugin import CompressionPlugin, CompressionSettings
from ryzen_plugin_semantic_compression.saved_activations import PeakTensorBytes
from ryzen_plugin_semantic_compression.sparse import current_sparsity, topk_layers

ADAPTING = dict(sparsity=0.0, sparsity_target=0.5, sparsity_step=0.25, saved_activations="off",
                saved_activations_target="int8", val_loss_tolerance=0.02)


def host_with(config=None, variant: str = "optimized", **settings):
    """A host with the plugin registered and one variant begun, as the trainer would begin it."""
    host = make_host({"compression": CompressionPlugin})
    host.settings = {"compression": CompressionSettings(**settings)}
    begin(host, variant, config)
    return host


def begin(host, variant: str, config=None) -> None:
    host.begin_variant(RunContext(config, None, Path("run"), Path("run") / variant, variant, ["compression"]),
                       ["compression"])


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=128, d_model=64, n_heads=2, n_layers=2, d_ff=256,
                                         context_length=64))


def evaluation(host, model, config, step: int, val_loss: float):
    """on_epoch_end at `step`, its Adaptation applied by the host as the trainer does; returns the Adaptation."""
    out = host.call_each("on_epoch_end", ["compression"], fallback=False, epoch=step // 10,
                         metrics={"step": step, "tokens": step * 100, "val_loss": val_loss}, model=model,
                         config=config)["compression"]
    if out is not None:
        host.apply_adaptation("compression", out)
    return out


def test_plugin_registers_its_hooks():
    host = host_with()
    assert host.records["compression"].status == "loaded"
    assert {"ryzen_settings", "on_model_load", "transform_forward", "on_epoch_end", "on_train_end", "on_infer",
            "register_commands"} <= set(host.records["compression"].hooks)


def test_settings_are_validated():
    with pytest.raises(ValueError):
        CompressionSettings(matryoshka_weights=[1.0])
    with pytest.raises(ValueError):
        CompressionSettings(sparsity=1.0)
    with pytest.raises(ValueError):
        CompressionSettings(saved_activations="fp8")
    with pytest.raises(ValueError):
        CompressionSettings(sparsity_tagret=0.5)
    with pytest.raises(ValueError, match="neither 'minilm' nor an encoder directory"):
        CompressionSettings(embedding_model="/nonexistent/encoder")


def test_on_model_load_makes_the_mlps_sparse():
    host, model = host_with(sparsity=0.75), tiny_model()
    host.call_each("on_model_load", ["compression"], fallback=False, model=model, tokenizer=None, config=None)
    assert len(topk_layers(model)) == 2 and topk_layers(model)[0].k == 64


def test_transform_forward_adds_the_nested_loss_and_compresses_saved_tensors():
    model = tiny_model()
    ids = torch.randint(0, 128, (8, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    base = reference_forward(model)
    host = host_with(matryoshka=True, saved_activations="int8")
    wrapped = host.fold("transform_forward", ["compression"], "forward", base, fallback=False, model=model,
                        config=None)
    assert wrapped is not base
    plain_loss = base(x, y).loss
    assert not torch.allclose(wrapped(x, y).loss, plain_loss)  # the prefix terms are in the loss
    with PeakTensorBytes() as plain_tracker:
        base(x, y).loss.backward()
    model.zero_grad(set_to_none=True)
    only_compression = host_with(matryoshka=False, saved_activations="int8")
    wrapped = only_compression.fold("transform_forward", ["compression"], "forward", base, fallback=False,
                                    model=model, config=None)
    with PeakTensorBytes() as compressed_tracker:
        loss = wrapped(x, y).loss
        loss.backward()
    torch.testing.assert_close(loss, plain_loss)
    assert compressed_tracker.peak < plain_tracker.peak
    events = [e.event for e in host.events]
    assert "matryoshka" in events and "saved_activations" in events


def test_the_forward_follows_an_adaptation_the_host_applies():
    """The host replaces the settings object on an Adaptation: the forward must read the new level."""
    model = tiny_model()
    ids = torch.randint(0, 128, (8, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    host = host_with(matryoshka=False, saved_activations="off")
    wrapped = host.fold("transform_forward", ["compression"], "forward", reference_forward(model),
                        fallback=False, model=model, config=None)

    def step_peak() -> int:
        model.zero_grad(set_to_none=True)
        with PeakTensorBytes() as tracker:
            wrapped(x, y).loss.backward()
        return tracker.peak

    exact = step_peak()
    host.apply_adaptation("compression", Adaptation({"saved_activations": "int8"}))
    assert step_peak() < exact


def test_on_epoch_end_steps_toward_the_targets_and_reverts_on_a_loss_jump():
    config = load_config(None, ["train.max_steps=1000", "train.eval_every=10"])
    host, model = host_with(config, **ADAPTING), tiny_model()
    host.call_each("on_model_load", ["compression"], fallback=False, model=model, tokenizer=None, config=config)

    first = evaluation(host, model, config, 10, 5.0)
    assert isinstance(first, Adaptation) and first.changes == {"sparsity": 0.25}
    assert current_sparsity(model) == 0.25 and host.settings["compression"].sparsity == 0.25
    assert evaluation(host, model, config, 20, 4.9).changes == {"sparsity": 0.5} and current_sparsity(model) == 0.5
    assert evaluation(host, model, config, 30, 4.8).changes == {"saved_activations": "bf16"}
    assert evaluation(host, model, config, 40, 6.0).changes == {"saved_activations": "off"}  # > 4.8 * 1.02
    s = host.settings["compression"]
    assert s.saved_activations == "off" and s.sparsity == 0.5 and host.instance("compression").settings is s
    assert evaluation(host, model, config, 50, 4.7) is None  # nothing left to try: saved_activations is frozen
    events = [(e.event, e.data.get("setting")) for e in host.events if e.hook == "on_epoch_end"]
    assert events == [("adapting", "sparsity"), ("adapting", "sparsity"), ("adapting", "saved_activations"),
                      ("reverted", "saved_activations")]


def test_a_sparsity_revert_puts_the_model_back():
    config = load_config(None, ["train.max_steps=1000", "train.eval_every=10"])
    host, model = host_with(config, **ADAPTING), tiny_model()
    host.call_each("on_model_load", ["compression"], fallback=False, model=model, tokenizer=None, config=config)
    evaluation(host, model, config, 10, 5.0)
    assert evaluation(host, model, config, 20, 9.0).changes == {"sparsity": 0.0}
    assert current_sparsity(model) == 0.0 and host.settings["compression"].sparsity == 0.0


def test_no_change_at_the_last_evaluation():
    config = load_config(None, ["train.max_steps=100", "train.eval_every=50"])
    host, model = host_with(config, sparsity_target=0.5), tiny_model()
    assert evaluation(host, model, config, 100, 4.0) is None


def test_each_variant_has_its_own_adaptation_state():
    config = load_config(None, ["train.max_steps=1000", "train.eval_every=10"])
    host, model = host_with(config, variant="optimized", **ADAPTING), tiny_model()
    evaluation(host, model, config, 10, 5.0)
    optimized = host.instance("compression")
    assert optimized.pending == ("sparsity", 0.0) and optimized.best_val == 5.0
    begin(host, "only-compression", config)
    fresh = host.instance("compression")
    assert fresh is not optimized and fresh.pending is None and fresh.best_val == float("inf")
    host.use_variant("optimized")
    assert host.instance("compression") is optimized and optimized.pending == ("sparsity", 0.0)


def test_resume_restores_the_pending_change_and_its_verdict():
    """The state goes through JSON (the checkpoint) into a fresh instance, which then judges the pending change."""
    config = load_config(None, ["train.max_steps=1000", "train.eval_every=10"])
    host, model = host_with(config, **ADAPTING), tiny_model()
    evaluation(host, model, config, 10, 5.0)
    evaluation(host, model, config, 20, 4.9)
    saved = json.loads(json.dumps(host.plugin_state()))
    assert saved == {"compression": {"best_val": 4.9, "pending": ["sparsity", 0.25], "frozen": []}}

    resumed = host_with(config, **dict(ADAPTING, sparsity=0.5))  # the settings a checkpoint restores
    resumed.load_plugin_state(saved)
    assert evaluation(resumed, model, config, 30, 6.0).changes == {"sparsity": 0.25}  # 6.0 > 4.9 * 1.02
    assert resumed.instance("compression").frozen == {"sparsity"}
    assert resumed.plugin_state()["compression"]["frozen"] == ["sparsity"]


def test_on_infer_decodes_and_measures_with_a_truncated_head():
    model = tiny_model().eval()
    calls = []

    def generate(input_ids, max_new_tokens, **sampling):
        calls.append(model.lm_head.weight.shape)
        return input_ids

    host = host_with(lm_head_dims=16)
    path = host.fold("on_infer", ["compression"], "generate", generate, fallback=False, model=model,
                     tokenizer=None, config=None)
    assert isinstance(path, InferencePath)
    ids = torch.randint(0, 128, (1, 5))
    path(ids, 3)
    assert calls == [torch.Size([128, 16])]
    assert model.lm_head.weight.shape == (128, 64)
    with torch.no_grad():  # perplexity is measured through the head that generates
        expected = truncated_logits(last_hidden(model, ids), model.lm_head, 16)
        torch.testing.assert_close(path.logits(ids), expected)
        assert not torch.allclose(path.logits(ids), lm_logits(model, ids).float())


def test_ryzen_run_reports_every_technique(compression_run):
    analysis = json.loads((compression_run / "optimization_analysis.json").read_text())
    events = {(e["hook"], e["event"]) for e in analysis["events"] if e["plugin"] == "compression"}
    for expected in [("on_model_load", "sparse_activations"), ("transform_forward", "matryoshka"),
                     ("on_epoch_end", "adapting"), ("on_train_end", "matryoshka_head_perplexity"),
                     ("on_train_end", "sparsity_perplexity"), ("on_train_end", "retrieval"),
                     ("on_train_end", "saved_activation_memory"), ("on_train_end", "matryoshka_embeddings")]:
        assert expected in events
    assert analysis["adaptations"]["optimized"]
    measured = json.loads((compression_run / "optimized" / "compression_analysis.json").read_text())
    assert measured["models"] == ["optimized", "baseline"]  # the live baseline, measured beside
    report = (compression_run / "optimized" / "compression_report.md").read_text()
    assert "binary+rescore(int8)" in report and "Matryoshka" in report and "vs dense baseline" in report
    assert "trained with and without the nested loss" in report and "principal axes" in report
    embeddings = measured["matryoshka_embeddings"]
    assert embeddings["nested"]["training"]["prefix_sizes"] == [2, 4, 8, 16, 32]
    assert embeddings["plain"]["training"]["prefix_sizes"] == [32] and embeddings["nested"]["training"]["epochs"] == 2
    assert (compression_run / "optimized" / "matryoshka-embedder" / "adaptor.safetensors").is_file()
    assert "## compression (optimized)" in (compression_run / "report.md").read_text()
    saved = json.loads((compression_run / "optimized" / "compression.json").read_text())
    assert saved["sparsity"] > 0


def test_embed_and_search_commands(compression_run, pairs_file, tmp_path):
    """The plugin's own click commands, in process: a subprocess would pay the CLI start-up twice."""
    collection = tmp_path / "docs.jsonl"
    lines = [json.loads(line)["document"] for line in pairs_file.read_text().splitlines()]
    collection.write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    index = tmp_path / "index"
    runner = CliRunner()
    embedded = runner.invoke(cli.embed, [str(collection), "--model", str(compression_run / "optimized"),
                                         "--out", str(index)])
    assert embedded.exit_code == 0, embedded.output
    info = json.loads((index / "index.json").read_text())
    assert info["bytes"]["float32"] == 32 * info["bytes"]["binary"]
    searched = runner.invoke(cli.search, [str(index), "the mean of the list", "--json", "-k", "3"])
    assert searched.exit_code == 0, searched.output
    result = json.loads(searched.output)
    assert len(result["results"][0]["results"]) == 3
    assert 0.0 <= result["summary"]["recall@3_vs_float32"] <= 1.0

    # The whole run holds two models: which one to embed with is the user's choice, named in the error.
    refused = runner.invoke(cli.embed, [str(collection), "--model", str(compression_run), "--out", str(tmp_path / "x")])
    assert isinstance(refused.exception, ConfigError)
    assert "baseline" in str(refused.exception) and "optimized" in str(refused.exception)
    assert not (tmp_path / "x").exists()
