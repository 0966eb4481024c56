"""The fused graph (graph_builder.py) and its in-place KV runtime: exact against torch,
a cache that is really written in place, the fallback for models it cannot write, and
the layouts optimum and onnxruntime-genai load."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, generate, hf_model_from_config, lm_logits, tiny_llama_config
from ryzen_plugin_onnx_export import plugin
from ryzen_plugin_onnx_export.fused_export import export_fused, quantize_weights
from ryzen_plugin_onnx_export.graph_builder import UnsupportedModel, build_graph
from ryzen_plugin_onnx_export.parity import check_parity, parity_token_ids, reference_text
from ryzen_plugin_onnx_export.runtime import FusedOrtBackend, load_export

VOCAB = 300


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def builtin() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    # head_dim 16: GroupQueryAttention's rotary needs a multiple of 16.
    config = tiny_llama_config(VOCAB, hidden=64, heads=4, kv_heads=2, intermediate=128, max_positions=96)
    return hf_model_from_config(config).eval()


@pytest.fixture(scope="module")
def exports(builtin, llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {"builtin": export_fused(builtin, None, root / "builtin"), "llama": export_fused(llama, None, root / "llama")}


@pytest.mark.parametrize("kind", ["builtin", "llama"])
def test_fused_graph_is_small_and_exact(kind, builtin, llama, exports):
    model = builtin if kind == "builtin" else llama
    graph = onnx.load(str(exports[kind] / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Concat" not in ops and "Softmax" not in ops
    assert len(ops) <= 12 * 2 + 12  # per layer ~9, plus embedding, mask and head
    backend = FusedOrtBackend(exports[kind])
    ids = _ids(3, 24)
    with torch.no_grad():
        expected = lm_logits(model, ids)
    assert (backend.logits(ids) - expected).abs().max().item() <= 1e-4
    assert torch.equal(backend.generate(ids, 20), generate(model, ids, 20))


def test_decode_writes_the_cache_in_place(exports):
    backend = FusedOrtBackend(exports["builtin"])
    decode = backend._decoder(batch=2, capacity=30)
    ids = _ids(2, 5).numpy()
    decode(ids)
    for step in range(4):
        decode(ids[:, :1])
    # The buffers the binding owns hold exactly the 9 positions written so far: the graph
    # wrote into them (no copy came back) and nothing past the current length.
    for buffer in decode.buffers:
        written = np.abs(buffer).sum(axis=(0, 1, 3)) > 0
        assert written[:9].all() and not written[9:].any()


def test_fused_graph_refuses_what_it_cannot_write_and_the_plugin_falls_back(builtin, tmp_path):
    changed = Transformer(builtin.config)
    changed.load_state_dict(builtin.state_dict())
    changed.blocks[0].mlp.activation = torch.nn.ReLU()
    with pytest.raises(UnsupportedModel, match="activation"):
        build_graph(changed)
    events = []
    settings = plugin.OnnxSettings(int8=False, int4=True, parity_tokens=16, parity_new_tokens=4)
    result = plugin.export_and_check(changed.eval(), None, tmp_path, settings,
                                     lambda event, **data: events.append((event, data)))
    assert list(result.exports) == ["onnxruntime-fp32"]
    assert result.backends["onnxruntime-fp32"].manifest.get("graph", "traced") == "traced"
    names = [event for event, _ in events]
    assert "fused_graph_unavailable" in names and "int4_skipped" in names


def test_quantized_llama_passes_parity_and_shrinks(llama, exports, tmp_path):
    ids = parity_token_ids(None, 48, VOCAB, text=reference_text())
    sizes = {}
    for precision in ("int8", "int4"):
        directory = quantize_weights(exports["llama"], tmp_path / precision, precision=precision)
        backend = load_export(directory)
        assert isinstance(backend, FusedOrtBackend) and backend.name == f"onnxruntime-{precision}"
        # Random weights give near-uniform logits, so only the logit error bound is meaningful here.
        check_parity(llama, backend, ids, precision=precision, new_tokens=8, int8_min_top1=0.0, int4_min_top1=0.0)
        sizes[precision] = (directory / "model.onnx").stat().st_size
    assert sizes["int4"] < sizes["int8"] < (exports["llama"] / "model.onnx").stat().st_size


def test_context_limit_of_a_rotary_export_is_its_table(llama, tmp_path):
    export = export_fused(llama, None, tmp_path / "short", max_positions=32)
    backend = FusedOrtBackend(export)
    assert backend.context_length == 32 and backend.hard_context_limit
    with pytest.raises(ValueError, match="context_length 32"):
        backend.generate(_ids(1, 30), 5)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                    reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")
@pytest.mark.parametrize("kind", ["builtin", "llama"])
def test_onnxruntime_genai_runs_the_export(kind, exports):
    import onnxruntime_genai as og

    ids = _ids(1, 8)
    expected = FusedOrtBackend(exports[kind]).generate(ids, 12)[0, 8:].tolist()
    model = og.Model(str(exports[kind]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=20, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.numpy().astype(np.int32))
    produced = []
    while not generator.is_done():
        generator.generate_next_token()
        produced.append(int(generator.get_next_tokens()[0]))
    assert produced == expected


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None,
                    reason="optimum[onnxruntime] is not installed (optimum-onnx 0.1 pins transformers<4.58, "
                           "which ryzen-core's transformers>=5 excludes)")
def test_optimum_loads_the_export(llama, exports):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(exports["llama"], config=llama.config, use_cache=True,
                                                use_io_binding=False)
    ids = _ids(1, 8)
    produced = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(produced, generate(llama, ids, 10))
