"""ONNX export, parity gate, onnxruntime backend and CLI of the onnx plugin, on tiny models.

Exports are slow-ish (seconds each), so each model is exported once per module and the
tests share the export directories read-only.
"""
from __future__ import annotations

import copy
import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from ryzen_core import (Backend, ExportResult, Tokenizer, Transformer, generate, lm_logits, load_hf_model,
                        save_hf_model, train_tokenizer)
from ryzen_core.testing import briefly_trained_model, make_host
from ryzen_plugin_onnx_export import plugin
from ryzen_plugin_onnx_export.export import export_onnx, quantize_int8, read_manifest
from ryzen_plugin_onnx_export.parity import ParityError, check_parity, parity_token_ids, reference_text
from ryzen_plugin_onnx_export.plugin import OnnxSettings
from ryzen_plugin_onnx_export.runtime import FusedOrtBackend, OrtBackend


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer([reference_text()], 320, tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="module")
def tiny_model(tokenizer) -> Transformer:
    """Briefly trained, so int8 top-1 agreement is measured on a model that has learned something."""
    return briefly_trained_model(tokenizer, reference_text(), steps=40, seq_len=32)


@pytest.fixture(scope="module")
def builtin_export(tiny_model, tokenizer, tmp_path_factory):
    """on_export through the plugin host, as the core calls it."""
    host = make_host({"onnx": plugin})
    host.settings["onnx"] = host.settings_models()["onnx"]()
    export_dir = tmp_path_factory.mktemp("export")
    results = host.call_each("on_export", ["onnx"], fallback=False, model=tiny_model, tokenizer=tokenizer,
                             export_dir=export_dir, config=None)
    return {"result": results["onnx"], "events": host.events, "export_dir": export_dir}


@pytest.fixture(scope="module")
def traced_backend(tiny_model, tokenizer, tmp_path_factory) -> OrtBackend:
    return OrtBackend(export_onnx(tiny_model, tokenizer, tmp_path_factory.mktemp("traced") / "fp32"))


@pytest.fixture(scope="module", params=["fused", "traced"])
def fp32_backend(request, builtin_export):
    """Both graph layouts must behave the same behind the Backend protocol."""
    if request.param == "traced":
        return request.getfixturevalue("traced_backend")
    return builtin_export["result"].backends["onnxruntime-fp32"]


@pytest.fixture(scope="module")
def hf_model(tokenizer, tmp_path_factory):
    model = briefly_trained_model(tokenizer, reference_text(), "llama", steps=30, seq_len=32, hidden=32, heads=4,
                                  kv_heads=2, intermediate=64, max_positions=64)
    saved = save_hf_model(model, tmp_path_factory.mktemp("hf-llama"))
    return load_hf_model(saved)


def _prompt(tokenizer, batch: int, length: int, offset: int = 0) -> torch.Tensor:
    return parity_token_ids(tokenizer, length, tokenizer.vocab_size, rows=batch, text=reference_text()[offset:])


# -- export + parity -----------------------------------------------------------------------


def test_on_export_builtin_passes_fp32_int8_and_int4_parity(builtin_export):
    result, export_dir = builtin_export["result"], builtin_export["export_dir"]
    assert isinstance(result, ExportResult)
    assert result.exports == {f"onnxruntime-{p}": export_dir / f"onnx-{p}" for p in ("fp32", "int8", "int4")}
    parity = result.details["parity"]
    fp32, int8, int4 = parity["onnxruntime-fp32"], parity["onnxruntime-int8"], parity["onnxruntime-int4"]
    assert fp32["passed"] and int8["passed"] and int4["passed"]
    assert int4["top1_agreement"] >= 0.75 and int4["max_abs_diff"] <= 0.3 * int4["max_abs_logit"]
    assert fp32["max_abs_diff"] <= 1e-3
    assert fp32["greedy_agreement"] == 1.0 and fp32["greedy_tokens"] > 0
    assert int8["top1_agreement"] >= 0.9
    assert int8["max_abs_diff"] <= 0.1 * int8["max_abs_logit"]
    assert 0.0 <= int8["greedy_agreement"] <= 1.0
    # Quantized weights shrink every MatMul, the tied LM head included.
    sizes = result.details["sizes_bytes"]
    assert sizes["onnxruntime-int4"] < sizes["onnxruntime-int8"] < sizes["onnxruntime-fp32"]
    assert set(result.backends) == set(result.exports)
    for backend in result.backends.values():
        assert isinstance(backend, Backend)
    # What the core writes into inference_validation_report.json under exports.onnx.
    report = json.loads(json.dumps(result.report()))
    assert report["exports"]["onnxruntime-int8"] == str(export_dir / "onnx-int8")
    assert report["parity"] == parity and report["sizes_bytes"] == sizes
    recorded = [(e.event, e.data.get("backend")) for e in builtin_export["events"]]
    assert ("parity", "onnxruntime-fp32") in recorded and ("parity", "onnxruntime-int8") in recorded
    assert ("export", "onnxruntime-fp32") in recorded and ("export", "onnxruntime-int8") in recorded


def test_export_manifest_describes_the_graph(builtin_export, tiny_model, tokenizer):
    import onnx

    fp32_dir = builtin_export["export_dir"] / "onnx-fp32"
    manifest = json.loads((fp32_dir / "export.json").read_text())
    config = tiny_model.config
    assert manifest["precision"] == "fp32" and manifest["graph"] == "fused"
    assert (manifest["layers"], manifest["kv_heads"], manifest["head_dim"]) == (
        config.n_layers, config.n_heads, config.head_dim)
    assert manifest["vocab_size"] == config.vocab_size and manifest["context_length"] == config.context_length
    assert manifest["eos_token_id"] == tokenizer.eos_id
    graph = onnx.load(str(fp32_dir / "model.onnx")).graph
    assert [i.name for i in graph.input] == manifest["input_names"]
    assert [o.name for o in graph.output] == manifest["output_names"]
    assert manifest["input_names"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    past_dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert past_dims == ["batch", config.n_heads, "past", config.head_dim]
    assert Tokenizer.load(fp32_dir).encode("def f(x):") == tokenizer.encode("def f(x):")
    for precision, bits in (("int8", 8), ("int4", 4)):
        quantized = read_manifest(builtin_export["export_dir"] / f"onnx-{precision}")
        assert quantized["precision"] == precision and quantized["graph"] == "fused"
        assert quantized["quantization"]["bits"] == bits and quantized["quantization"]["block_size"] == 32
        ops = {node.op_type for node in onnx.load(str(builtin_export["export_dir"] / f"onnx-{precision}" / "model.onnx")).graph.node}
        assert "MatMulNBits" in ops and "MatMul" not in ops


def test_traced_export_and_dynamic_int8_still_work(tiny_model, tokenizer, traced_backend, tmp_path):
    manifest = read_manifest(traced_backend.export_dir)
    assert manifest["exporter"].startswith("torch.onnx.export(dynamo=True)") and manifest["opset"] == 18
    assert manifest.get("graph", "traced") == "traced"
    int8_dir = quantize_int8(traced_backend.export_dir, tmp_path / "int8")
    quantization = read_manifest(int8_dir)["quantization"]
    assert quantization["per_channel"] is True and quantization["activation_type"] == "QUInt8 (dynamic)"
    ids = parity_token_ids(tokenizer, 32, tiny_model.config.vocab_size)
    assert check_parity(tiny_model, OrtBackend(int8_dir), ids, precision="int8", new_tokens=8)["passed"]


@pytest.mark.parametrize("flags, expected", [(["avx2", "avx512f", "avx512_vnni"], False), (["avx2", "avx_vnni"], False),
                                             (["avx2", "fma"], True), (["avx2", "avx512f", "avx512bw"], True)])
def test_int8_weight_range_follows_vnni(monkeypatch, flags, expected):
    from ryzen_core import CpuFeatures, hardware

    cpu = CpuFeatures(model="test CPU", logical_cores=2, usable_cores=2, features=hardware.parse_flags(flags))
    monkeypatch.setattr(hardware, "cpu_features", lambda mask=(): cpu)
    reduce_range, why = plugin.resolve_reduce_range("auto")
    assert reduce_range is expected and ("no VNNI" in why) == expected
    assert plugin.resolve_reduce_range(True) == (True, "set in config")


def test_hf_llama_traced_export_passes_parity(hf_model, tokenizer, tmp_path):
    import onnx

    fp32_dir = export_onnx(hf_model, tokenizer, tmp_path / "fp32")
    manifest = read_manifest(fp32_dir)
    assert manifest["kind"] == "hf:llama" and manifest["kv_heads"] == 2 and manifest["head_dim"] == 8
    past = onnx.load(str(fp32_dir / "model.onnx")).graph.input[1]
    assert [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim] == ["batch", 2, "past_len", 8]
    ids = parity_token_ids(tokenizer, 48, hf_model.config.vocab_size)
    fp32 = check_parity(hf_model, OrtBackend(fp32_dir), ids, precision="fp32", new_tokens=16)
    assert fp32["max_abs_diff"] <= 1e-3 and fp32["greedy_agreement"] == 1.0
    int8_dir = quantize_int8(fp32_dir, tmp_path / "int8")
    int8 = check_parity(hf_model, OrtBackend(int8_dir), ids, precision="int8", new_tokens=16)
    assert int8["passed"] and int8["top1_agreement"] >= 0.9


def test_broken_export_raises_parity_error_with_numbers(tiny_model, fp32_backend, tokenizer):
    perturbed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        # The export still holds the original weights. (A constant shift would be undone by
        # the next LayerNorm, so the perturbation is random.)
        weight = perturbed.blocks[0].mlp.down.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    ids = parity_token_ids(tokenizer, 32, tiny_model.config.vocab_size)
    with pytest.raises(ParityError) as caught:
        check_parity(perturbed, fp32_backend, ids, precision="fp32", new_tokens=8)
    message = str(caught.value)
    assert "\n" not in message
    assert "onnxruntime-fp32 parity failed" in message and "max abs logit diff" in message
    assert any(ch.isdigit() for ch in message.split("max abs logit diff", 1)[1])


def test_int8_parity_fails_beyond_its_bound(tiny_model, builtin_export, tokenizer):
    int8_backend = builtin_export["result"].backends["onnxruntime-int8"]
    perturbed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        perturbed.lm_head.weight.mul_(-1.0)  # tied: flips every logit's sign
    ids = parity_token_ids(tokenizer, 32, tiny_model.config.vocab_size)
    with pytest.raises(ParityError, match=r"onnxruntime-int8 parity failed.*top-1 agreement \d"):
        check_parity(perturbed, int8_backend, ids, precision="int8", new_tokens=4)


# -- runtime ---------------------------------------------------------------------------------


def test_cached_greedy_generation_equals_torch_token_for_token(tiny_model, fp32_backend, tokenizer):
    prompt = _prompt(tokenizer, batch=2, length=6)
    expected = generate(tiny_model, prompt, 40)
    steps: list[int] = []
    actual = fp32_backend.generate(prompt, 40, on_token=steps.append)
    assert torch.equal(actual, expected)
    assert steps == list(range(40))


def test_generation_stops_at_eos_like_torch(tiny_model, fp32_backend, tokenizer):
    prompt = _prompt(tokenizer, batch=1, length=5)
    greedy = generate(tiny_model, prompt, 12)[0, 5:]
    eos = int(greedy[3])  # a token greedy decoding reaches at step 3 at the latest
    expected = generate(tiny_model, prompt, 12, eos_token_id=eos)
    actual = fp32_backend.generate(prompt, 12, eos_token_id=eos)
    assert torch.equal(actual, expected)
    assert actual.shape[1] < 5 + 12


def test_traced_logits_with_and_without_cache_agree(traced_backend, tokenizer):
    fp32_backend = traced_backend
    ids = _prompt(tokenizer, batch=2, length=20).numpy()
    full = fp32_backend.logits(torch.from_numpy(ids)).numpy()
    # Prefill 7 tokens, then a 5-token chunk (mask with both past and several queries), then single tokens.
    past = [np.zeros((2, fp32_backend.kv_heads, 0, fp32_backend.head_dim), np.float32)] * (2 * fp32_backend.layers)
    pieces = []
    for start, end in [(0, 7), (7, 12)] + [(i, i + 1) for i in range(12, 20)]:
        logits, past = fp32_backend.step(ids[:, start:end], past)
        pieces.append(logits)
    assert past[0].shape[2] == 20
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


def test_sampling_with_same_seed_matches_torch(tiny_model, fp32_backend, tokenizer):
    prompt = _prompt(tokenizer, batch=2, length=4)
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    expected = generate(tiny_model, prompt, 30, generator=torch.Generator().manual_seed(7), **sampling)
    actual = fp32_backend.generate(prompt, 30, generator=torch.Generator().manual_seed(7), **sampling)
    assert torch.equal(actual, expected)
    other_seed = fp32_backend.generate(prompt, 30, generator=torch.Generator().manual_seed(8), **sampling)
    assert not torch.equal(other_seed, expected)  # the seed really drives the sampling


@pytest.mark.parametrize("batch, length", [(1, 1), (1, 17), (3, 5), (3, 33)])
def test_dynamic_batch_and_sequence_axes(tiny_model, fp32_backend, tokenizer, batch, length):
    ids = _prompt(tokenizer, batch=batch, length=max(length, 2))[:, :length]
    with torch.no_grad():
        expected = lm_logits(tiny_model, ids)
    actual = fp32_backend.logits(ids)
    assert actual.shape == (batch, length, tiny_model.config.vocab_size) and actual.dtype == torch.float32
    assert (actual - expected).abs().max().item() <= 1e-4
    generated = fp32_backend.generate(ids, 3)
    assert torch.equal(generated, generate(tiny_model, ids, 3))


def test_context_length_is_enforced_for_the_builtin_model(fp32_backend, tokenizer):
    prompt = _prompt(tokenizer, batch=1, length=60)
    with pytest.raises(ValueError, match="exceeds the model's context_length 64"):
        fp32_backend.generate(prompt, 5)


# -- hooks, settings, CLI ----------------------------------------------------------------------


def test_load_backend_only_claims_our_exports(builtin_export, tmp_path):
    assert plugin.load_backend(tmp_path) is None
    (tmp_path / "export.json").write_text(json.dumps({"format": "someone-else"}))
    assert plugin.load_backend(tmp_path) is None
    (tmp_path / "export.json").write_text("{not json")
    assert plugin.load_backend(tmp_path) is None
    backend = plugin.load_backend(builtin_export["export_dir"] / "onnx-int8")
    assert isinstance(backend, FusedOrtBackend) and backend.name == "onnxruntime-int8"


def test_on_export_without_int8_writes_only_fp32(tiny_model, tokenizer, tmp_path):
    settings = OnnxSettings(int8=False, int4=False, graph_optimization="basic", threads=1, parity_tokens=16, parity_new_tokens=4)
    result = plugin.on_export(model=tiny_model, tokenizer=tokenizer, export_dir=tmp_path, settings=settings,
                              record=lambda event, **data: None)
    assert isinstance(result, ExportResult) and list(result.exports) == ["onnxruntime-fp32"]
    assert not (tmp_path / "onnx-int8").exists()
    assert result.details["parity"]["onnxruntime-fp32"]["logit_positions"] == 2 * 16


def test_settings_forbid_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        OnnxSettings(int8_precision=True)
    with pytest.raises(ValidationError):
        OnnxSettings(graph_optimization="max")
    with pytest.raises(ValidationError):
        OnnxSettings(opset=17)
    with pytest.raises(ValidationError):
        OnnxSettings(block_size=48)
    with pytest.raises(ValidationError):
        OnnxSettings(accuracy_level=5)


def _cli() -> click.Group:
    @click.group()
    def cli():
        pass

    plugin.register_commands(cli)
    return cli


def test_generate_command_prints_text(builtin_export):
    export = builtin_export["export_dir"] / "onnx-fp32"
    result = CliRunner().invoke(_cli(), ["generate", "--onnx", str(export), "def parity", "--max-new-tokens", "8",
                                         "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def parity") and len(result.stdout.strip()) > len("def parity")
    again = CliRunner().invoke(_cli(), ["generate", "--onnx", str(export), "def parity", "--max-new-tokens", "8",
                                        "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    assert again.stdout == result.stdout


def test_generate_command_rejects_missing_or_foreign_dir(tmp_path):
    missing = CliRunner().invoke(_cli(), ["generate", "--onnx", str(tmp_path / "nope"), "hello"])
    assert missing.exit_code == 2
    assert missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    foreign = CliRunner().invoke(_cli(), ["generate", "--onnx", str(tmp_path), "hello"])
    assert foreign.exit_code == 2
    assert foreign.stderr.count("\n") == 1 and "is not an onnx export" in foreign.stderr


def test_generate_command_reports_context_overflow_in_one_line(builtin_export):
    export = builtin_export["export_dir"] / "onnx-fp32"
    result = CliRunner().invoke(_cli(), ["generate", "--onnx", str(export), "x", "--max-new-tokens", "500"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "context_length" in result.stderr


def _broken_copy(export, tmp_path, change):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(export, copy_dir)
    change(copy_dir)
    return copy_dir


def _truncate(directory):
    data = (directory / "model.onnx").read_bytes()
    (directory / "model.onnx").write_bytes(data[: len(data) // 2])


def _claim_longer_context(directory):
    manifest = json.loads((directory / "export.json").read_text())
    (directory / "export.json").write_text(json.dumps({**manifest, "context_length": 4096}))


@pytest.mark.parametrize("change, args, message", [
    (_truncate, [], "cannot be loaded by onnxruntime"),
    (lambda d: (d / "model.onnx").write_bytes(b""), [], "cannot be loaded by onnxruntime"),
    (lambda d: (d / "model.onnx").write_bytes(b"garbage" * 100), [], "cannot be loaded by onnxruntime"),
    (_claim_longer_context, [], "claims context_length 4096"),
    (lambda d: None, ["--temperature", "nan"], "--temperature must be a finite number"),
    (lambda d: None, ["--threads", "5000"], "--threads"),
])
def test_generate_command_turns_bad_exports_and_inputs_into_one_line(builtin_export, tmp_path, change, args,
                                                                     message):
    export = _broken_copy(builtin_export["export_dir"] / "onnx-fp32", tmp_path, change)
    result = CliRunner().invoke(_cli(), ["generate", "--onnx", str(export), "def f", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_generate_command_refuses_a_surrogate_prompt_in_one_line(builtin_export):
    result = CliRunner().invoke(_cli(), ["generate", "--onnx", str(builtin_export["export_dir"] / "onnx-fp32"),
                                         "def \ud800"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_generate_command_cuts_the_default_length_to_the_context_with_a_note(builtin_export, tokenizer):
    export = builtin_export["export_dir"] / "onnx-fp32"
    prompt = reference_text()[:60]  # the tiny model's context is 64 tokens: 64 new ones do not fit after it
    prompt_tokens = len(tokenizer.encode(prompt))
    assert 0 < prompt_tokens < 64
    result = CliRunner().invoke(_cli(), ["generate", "--onnx", str(export), prompt])
    assert result.exit_code == 0, result.output
    assert f"note: {64 - prompt_tokens} new tokens, what fits the context of 64" in result.stderr
