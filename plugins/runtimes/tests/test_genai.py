"""onnxruntime-genai: its model builder on the HF Llama directory, its Generator as a backend."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import lm_logits
from ryzen_plugin_runtimes.plugin import RuntimesSettings, export_all, load_backend
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                    "(pip install 'ryzen-plugin-runtimes[genai]')")


@pytest.fixture(scope="module")
def exported(llama_model, tokenizer, tmp_path_factory):
    settings = RuntimesSettings(engines=["genai"], genai=["fp32", "int4"])
    return export_all(llama_model, tokenizer, tmp_path_factory.mktemp("export"), settings)


def test_builder_output_loads_from_its_directory(exported):
    assert sorted(exported.exports) == ["genai-fp32", "genai-int4"]
    assert exported.details["skipped"] == {}
    assert exported.details["sizes_bytes"]["genai-int4"] < exported.details["sizes_bytes"]["genai-fp32"]
    for name, path in exported.exports.items():
        assert load_backend(path).name == name


def test_fp32_follows_torch(exported, llama_model, follows_torch):
    follows_torch(load_backend(exported.exports["genai-fp32"]), llama_model, atol=1e-3)


def test_int4_keeps_the_top_token_mostly(exported, llama_model, prompts):
    backend = load_backend(exported.exports["genai-int4"])
    with torch.inference_mode():
        expected = lm_logits(llama_model, prompts)
    assert (backend.logits(prompts).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.6
    assert backend.generate(prompts, 6).shape == (2, prompts.shape[1] + 6)


def test_eos_stops_generation_and_pads(exported, prompts):
    backend = load_backend(exported.exports["genai-fp32"])
    free = backend.generate(prompts, 8)
    eos = int(free[1, prompts.shape[1] + 1])
    stopped = backend.generate(prompts, 8, eos_token_id=eos)
    row = stopped[1, prompts.shape[1]:].tolist()
    assert row.index(eos) <= 1 and all(t == eos for t in row[row.index(eos):])


def test_tokenizer_identity_on_the_fixed_texts(exported, tokenizer):
    """onnxruntime-genai's tokenizer reads "<|endoftext|>" inside a text as the special token, where Ryzen
    (encode_special_tokens) reads it as text; every other text must give the same ids."""
    backend = load_backend(exported.exports["genai-fp32"])
    for text in IDENTITY_TEXTS:
        if tokenizer.eos_token in text:
            assert tokenizer.eos_id in backend.encode(text) and tokenizer.eos_id not in tokenizer.encode(text)
        else:
            assert backend.encode(text) == tokenizer.encode(text), text


def test_the_builtin_model_runs_on_the_onnx_plugins_fused_graph(builtin_model, tokenizer, tmp_path, follows_torch):
    """The builder has no GPT-2; genai runs the onnx plugin's fused graph of the built-in model instead."""
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["genai"], genai=["fp32"]))
    assert list(result.exports) == ["genai-fp32"] and result.details["skipped"] == {}
    path = result.exports["genai-fp32"]
    assert not (tmp_path / "genai-fp32" / "export.json").exists()  # the onnx plugin must not claim it
    backend = load_backend(path)
    assert backend.name == "genai-fp32"
    follows_torch(backend, builtin_model, atol=1e-4)


def test_sampling_repeats_for_the_same_seed(exported, prompts):
    backend = load_backend(exported.exports["genai-int4"])

    def sample(seed: int) -> torch.Tensor:
        return backend.generate(prompts, 8, temperature=1.5, top_k=0, generator=torch.Generator().manual_seed(seed))

    first = sample(5)
    assert torch.equal(first, sample(5)) and first.shape == (2, prompts.shape[1] + 8)


def test_genai_runs_the_onnx_plugins_graph_of_a_llama_beside_its_own(llama_model, tokenizer, tmp_path, follows_torch):
    """genai_graphs: [builder, ryzen] gives both graphs of one Llama, so their rows separate graph from loop."""
    settings = RuntimesSettings(engines=["genai"], genai=["fp32"], genai_graphs=["builder", "ryzen"])
    result = export_all(llama_model, tokenizer, tmp_path, settings)
    assert sorted(result.exports) == ["genai-fp32", "genai-ryzen-fp32"] and result.details["skipped"] == {}
    ours = load_backend(result.exports["genai-ryzen-fp32"])
    assert ours.name == "genai-ryzen-fp32" and ours.precision == "fp32"
    follows_torch(ours, llama_model, atol=1e-3)


def test_a_builtin_model_gets_no_second_copy_of_the_same_graph(builtin_model, tokenizer, tmp_path):
    settings = RuntimesSettings(engines=["genai"], genai=["fp32"], genai_graphs=["builder", "ryzen"])
    result = export_all(builtin_model, tokenizer, tmp_path, settings)
    assert list(result.exports) == ["genai-fp32"]
    assert "same graph" in result.details["skipped"]["genai-ryzen-fp32"]
