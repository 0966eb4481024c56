"""The plugin through its hooks: settings, the training forward, adaptation, and `ryzen run`/`embed`/`search`."""
from __future__ import annotations

import json

import pytest
import torch

from ryzen_core.config import load_config
from ryzen_core.forward import reference_forward
from ryzen_core.models import Transformer, TransformerConfig
from ryzen_core.plugins import PluginHost
from ryzen_plugin_semantic_compression import plugin
from ryzen_plugin_semantic_compression.plugin import CompressionSettings
from ryzen_plugin_semantic_compression.saved_activations import PeakTensorBytes
from ryzen_plugin_semantic_compression.sparse import current_sparsity, topk_layers


def host_with(**settings) -> PluginHost:
    host = PluginHost()
    host.register(plugin, "compression")
    host.settings = {"compression": CompressionSettings(**settings)}
    return host


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=128, d_model=64, n_heads=2, n_layers=2, d_ff=256,
                                         context_length=64))


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


def test_on_epoch_end_steps_toward_the_targets_and_reverts_on_a_loss_jump():
    settings = dict(sparsity=0.0, sparsity_target=0.5, sparsity_step=0.25, saved_activations="off",
                    saved_activations_target="int8", val_loss_tolerance=0.02)
    host, model = host_with(**settings), tiny_model()
    config = load_config(None, ["train.max_steps=1000", "train.eval_every=10"])
    host.call_each("on_model_load", ["compression"], fallback=False, model=model, tokenizer=None, config=config)

    def epoch(step: int, val_loss: float):
        out = host.call_each("on_epoch_end", ["compression"], fallback=False, epoch=step // 10,
                             metrics={"step": step, "tokens": step * 100, "val_loss": val_loss}, model=model,
                             config=config)
        return out["compression"]

    s = host.settings["compression"]
    assert epoch(10, 5.0) == {"sparsity": 0.25} and current_sparsity(model) == 0.25
    assert epoch(20, 4.9) == {"sparsity": 0.5} and current_sparsity(model) == 0.5
    assert epoch(30, 4.8) == {"saved_activations": "bf16"}
    assert epoch(40, 6.0) == {"saved_activations": "off"}  # 6.0 > 4.8 * 1.02: reverted and frozen
    assert s.saved_activations == "off" and s.sparsity == 0.5
    assert epoch(50, 4.7) is None  # nothing left to try
    events = [(e.event, e.data.get("setting")) for e in host.events if e.hook == "on_epoch_end"]
    assert events == [("adapting", "sparsity"), ("adapting", "sparsity"), ("adapting", "saved_activations"),
                      ("reverted", "saved_activations")]


def test_no_change_at_the_last_evaluation():
    host, model = host_with(sparsity_target=0.5), tiny_model()
    config = load_config(None, ["train.max_steps=100", "train.eval_every=50"])
    out = host.call_each("on_epoch_end", ["compression"], fallback=False, epoch=2,
                         metrics={"step": 100, "tokens": 10000, "val_loss": 4.0}, model=model, config=config)
    assert out["compression"] is None


def test_on_infer_decodes_with_a_truncated_head():
    model = tiny_model().eval()
    calls = []

    def generate(input_ids, max_new_tokens, **sampling):
        calls.append(model.lm_head.weight.shape)
        return input_ids

    host = host_with(lm_head_dims=16)
    wrapped = host.fold("on_infer", ["compression"], "generate", generate, fallback=False, model=model,
                        tokenizer=None, config=None)
    wrapped(torch.zeros(1, 2, dtype=torch.long), 3)
    assert calls == [torch.Size([128, 16])]
    assert model.lm_head.weight.shape == (128, 64)


def test_ryzen_run_reports_every_technique(compression_run):
    analysis = json.loads((compression_run / "optimization_analysis.json").read_text())
    events = {(e["hook"], e["event"]) for e in analysis["events"] if e["plugin"] == "compression"}
    for expected in [("on_model_load", "sparse_activations"), ("transform_forward", "matryoshka"),
                     ("on_epoch_end", "adapting"), ("on_train_end", "matryoshka_head_perplexity"),
                     ("on_train_end", "sparsity_perplexity"), ("on_train_end", "retrieval"),
                     ("on_train_end", "saved_activation_memory"), ("on_train_end", "matryoshka_embeddings")]:
        assert expected in events
    assert analysis["adaptations"]["optimized"]
    report = (compression_run / "optimized" / "compression_report.md").read_text()
    assert "binary+rescore(int8)" in report and "Matryoshka" in report
    assert "trained with and without the nested loss" in report and "principal axes" in report
    embeddings = json.loads((compression_run / "optimized" / "compression_analysis.json").read_text())[
        "matryoshka_embeddings"]
    assert embeddings["nested"]["training"]["prefix_sizes"] == [2, 4, 8, 16, 32]
    assert embeddings["plain"]["training"]["prefix_sizes"] == [32] and embeddings["nested"]["training"]["epochs"] == 2
    assert (compression_run / "optimized" / "matryoshka-embedder" / "adaptor.safetensors").is_file()
    assert "## compression (optimized)" in (compression_run / "report.md").read_text()
    saved = json.loads((compression_run / "optimized" / "compression.json").read_text())
    assert saved["sparsity"] > 0


def test_embed_and_search_commands(compression_run, pairs_file, tmp_path):
    """Through the host's register_commands, in process: a subprocess would pay the CLI start-up twice."""
    from click.testing import CliRunner

    from ryzen_core.cli import build_cli

    host = PluginHost()
    host.register(plugin, "compression")
    cli = build_cli(host)
    collection = tmp_path / "docs.jsonl"
    lines = [json.loads(line)["document"] for line in pairs_file.read_text().splitlines()]
    collection.write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    index = tmp_path / "index"
    runner = CliRunner()
    embedded = runner.invoke(cli, ["embed", str(collection), "--model", str(compression_run), "--out", str(index)],
                             obj={"host": host})
    assert embedded.exit_code == 0, embedded.output
    info = json.loads((index / "index.json").read_text())
    assert info["bytes"]["float32"] == 32 * info["bytes"]["binary"]
    searched = runner.invoke(cli, ["search", str(index), "the mean of the list", "--json", "-k", "3"],
                             obj={"host": host})
    assert searched.exit_code == 0, searched.output
    result = json.loads(searched.output)
    assert len(result["results"][0]["results"]) == 3
    assert 0.0 <= result["summary"]["recall@3_vs_float32"] <= 1.0
