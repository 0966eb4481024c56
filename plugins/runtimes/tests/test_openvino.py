"""OpenVINO: the stateful model written by openvino_builder, against torch, for the built-in model and a Llama."""
from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest
import torch

from ryzen_core import generate, lm_logits, quality_class
from ryzen_plugin_runtimes.manifest import EngineSkipped
from ryzen_plugin_runtimes.plugin import RuntimesSettings, export_all, load_backend
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ryzen-plugin-runtimes[openvino]')")
NNCF_MISSING = importlib.util.find_spec("nncf") is None


@pytest.fixture(scope="module", params=["builtin", "llama"])
def exported(request, tokenizer, tmp_path_factory):
    model = request.getfixturevalue(f"{request.param}_model")
    settings = RuntimesSettings(engines=["openvino"])
    return model, export_all(model, tokenizer, tmp_path_factory.mktemp("export"), settings)


def token_rows(tokenizer, batch: int, length: int) -> torch.Tensor:
    """`batch` rows of `length` ids from the fixed texts (which the test models were trained on)."""
    ids = tokenizer.encode("\n".join(IDENTITY_TEXTS))
    return torch.tensor([ids[7 * row: 7 * row + length] for row in range(batch)])


def test_fp32_follows_torch(exported, follows_torch):
    model, result = exported
    assert result.details["parity"]["openvino-fp32"]["max_abs_logit_diff"] < 1e-4
    follows_torch(load_backend(result.exports["openvino-fp32"]), model, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_through_the_cache_gives_the_full_sequence_logits(exported, tokenizer, batch):
    """A prefill then one token at a time through the model's own state, as generate runs it."""
    model, result = exported
    backend = load_backend(result.exports["openvino-fp32"])
    ids = token_rows(tokenizer, batch, 14)
    with torch.inference_mode():
        expected = lm_logits(model, ids)
    backend.reset()
    parts = [np.array(backend.forward(ids[:, :6].numpy()))]
    parts += [np.array(backend.forward(ids[:, t:t + 1].numpy())) for t in range(6, ids.shape[1])]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(parts, axis=1)), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_at_batch_8_are_torchs(exported, tokenizer):
    model, result = exported
    backend = load_backend(result.exports["openvino-fp32"])
    prompts = token_rows(tokenizer, 8, 9)
    with torch.inference_mode():
        expected = generate(model, prompts, 12)
    assert torch.equal(backend.generate(prompts, 12), expected)


def test_each_call_starts_from_an_empty_cache(exported, prompts):
    _, result = exported
    backend = load_backend(result.exports["openvino-fp32"])
    before = backend.logits(prompts)
    first = backend.generate(prompts, 6)
    assert torch.equal(backend.generate(prompts, 6), first)
    assert torch.equal(backend.generate(prompts[:1], 6), first[:1])  # another batch size after a batch of 2
    torch.testing.assert_close(backend.logits(prompts), before, atol=0, rtol=0)


def test_the_model_is_stateful_and_the_cpu_plugin_fuses_the_cache_into_attention(exported):
    """One ReadValue/Assign pair per layer and the in-place cached attention (StatefulSDPAFusion): the speed
    of the export rests on it, so a graph change that breaks the fusion fails here."""
    model, result = exported
    layers = len(getattr(model, "blocks", None) or model.model.layers)
    path = result.exports["openvino-fp32"] / "model.xml"
    ir = ov.Core().read_model(path)
    kinds = [op.get_type_name() for op in ir.get_ops()]
    assert kinds.count("ReadValue") == kinds.count("Assign") == 2 * layers
    assert kinds.count("ScaledDotProductAttention") == layers
    assert {p.get_any_name() for p in ir.inputs} == {"input_ids", "attention_mask", "position_ids", "beam_idx"}
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    attention = [op for op in compiled.get_runtime_model().get_ops()
                 if op.get_rt_info()["layerType"].astype(str) == "ScaledDotProductAttention"]
    assert len(attention) == layers
    assert all(op.get_input_size() == 8 for op in attention)  # q, k, v, mask, scale, beam_idx, past k, past v


def test_fp32_keeps_an_f32_cache(exported):
    _, result = exported
    assert load_backend(result.exports["openvino-fp32"]).kv_cache_precision == "f32"


@pytest.mark.skipif(NNCF_MISSING, reason="nncf is not installed (pip install 'ryzen-plugin-runtimes[openvino]')")
def test_weight_compression_shrinks_the_weights_and_keeps_the_top_token(exported, prompts):
    model, result = exported
    with torch.inference_mode():
        expected = lm_logits(model, prompts)
    backends = {p: load_backend(result.exports[f"openvino-{p}"]) for p in ("fp32", "int8", "int4")}
    weights = {p: (result.exports[f"openvino-{p}"] / "model.bin").stat().st_size for p in backends}  # not the xml
    assert weights["int4"] < weights["int8"] < weights["fp32"] / 3
    assert quality_class(backends["int8"].precision) == "8-bit"
    for precision in ("int8", "int4"):
        agreement = (backends[precision].logits(prompts).argmax(-1) == expected.argmax(-1)).float().mean()
        assert agreement >= 0.6, precision
        assert backends[precision].generate(prompts, 4).shape == (2, prompts.shape[1] + 4)


@pytest.mark.skipif(not NNCF_MISSING, reason="nncf is installed: the compressed exports are built")
def test_without_nncf_compression_is_skipped_with_the_reason(exported):
    _, result = exported
    for name in ("openvino-int8", "openvino-int4"):
        assert "nncf" in result.details["skipped"][name]


def test_context_length_is_checked(exported, builtin_model):
    model, result = exported
    backend = load_backend(result.exports["openvino-fp32"])
    if model is not builtin_model:  # rotary positions: no hard limit
        assert backend.context_length is None
        return
    prompt = torch.zeros((1, model.config.context_length - 2), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        backend.generate(prompt, 3)


def test_other_architectures_are_skipped_with_the_reason():
    from ryzen_plugin_runtimes.openvino_builder import build_model

    with pytest.raises(EngineSkipped, match="not 'mistral'"):
        build_model(types.SimpleNamespace(config=types.SimpleNamespace(model_type="mistral")))
