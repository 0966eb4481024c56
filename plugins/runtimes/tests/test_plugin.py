"""The runtimes plugin without any engine: discovery, settings, the GPT-2 form of the built-in model,
skipping with reasons, and load_backend's dispatch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from ryzen_core import ExportResult, PluginHost, Transformer, TransformerConfig, lm_logits
from ryzen_core.testing import make_host
from ryzen_plugin_runtimes import plugin
from ryzen_plugin_runtimes.hf_source import gpt2_from_builtin, write_hf_source
from ryzen_plugin_runtimes.manifest import EngineSkipped, RuntimeExportError, write_manifest
from ryzen_plugin_runtimes.plugin import RuntimesSettings, export_all, load_backend


def test_plugin_is_installed():
    host = PluginHost()
    host.load_installed(["runtimes"])
    record = host.records.get("runtimes")
    assert record is not None and record.status == "loaded", record and record.error
    assert {"on_export", "load_backend", "ryzen_settings"} <= set(record.hooks)


def test_settings_choose_engines_and_precisions():
    settings = RuntimesSettings(engines=["ctranslate2", "genai", "ctranslate2"], ctranslate2=["int8"], genai=["int4"])
    assert settings.wanted() == [("ctranslate2", "int8"), ("genai", "int4")]
    both = RuntimesSettings(engines=["genai"], genai=["int8"], genai_graphs=["builder", "ryzen"])
    assert both.wanted() == [("genai", "int8"), ("genai", "ryzen-int8")]
    assert RuntimesSettings(engines=["genai"], genai=["fp32"], genai_graphs=["ryzen"]).wanted() == [("genai", "ryzen-fp32")]
    with pytest.raises(ValidationError, match="power of two"):
        RuntimesSettings(block_size=48)
    with pytest.raises(ValidationError):
        RuntimesSettings(engines=["tensorrt"])
    with pytest.raises(ValidationError):
        RuntimesSettings(llamacpp=["Q5_K"])


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_form_of_the_builtin_model_gives_the_same_logits(tied, tokenizer):
    torch.manual_seed(1)
    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size,
                                                      tie_embeddings=tied)).eval()
    with torch.no_grad():  # the random init is small; larger weights make a layout mistake show in the logits
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    ids = torch.randint(0, tokenizer.vocab_size, (2, model.config.context_length))
    with torch.inference_mode():
        ours = lm_logits(model, ids)
        theirs = gpt2_from_builtin(model)(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_hf_source_directory_loads_back_with_transformers(builtin_model, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from ryzen_core import load_hf_model

    write_hf_source(builtin_model, tokenizer, tmp_path)
    ids = torch.tensor([tokenizer.encode("def forward(self, x):")])
    with torch.inference_mode():
        expected = lm_logits(builtin_model, ids)
        torch.testing.assert_close(load_hf_model(tmp_path)(ids).logits, expected, atol=1e-4, rtol=0)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == tokenizer.eos_token


def test_a_model_changed_by_a_plugin_is_skipped_with_the_reason(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
    model.blocks[1].mlp.activation = nn.ReLU()
    with pytest.raises(EngineSkipped, match="block 1 MLP activation"):
        gpt2_from_builtin(model)
    events = []
    settings = RuntimesSettings(engines=["ctranslate2"])
    if plugin.engine_module("ctranslate2").missing():
        pytest.skip("ctranslate2 is not installed: the engine is skipped before the model is looked at")
    result = export_all(model, tokenizer, tmp_path, settings, lambda event, **data: events.append((event, data)))
    assert result.exports == {}
    assert set(result.details["skipped"]) == {"ctranslate2-float32", "ctranslate2-int8"}
    assert all("activation" in reason for reason in result.details["skipped"].values())
    assert [e for e, _ in events] == ["skipped", "skipped"]


def test_engines_that_are_not_installed_are_skipped_with_the_reason(builtin_model, tokenizer, tmp_path, monkeypatch):
    module = plugin.engine_module("ctranslate2")
    monkeypatch.setattr(module, "missing", lambda: "ctranslate2 is not installed (test)")
    events = []
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["ctranslate2"]),
                        lambda event, **data: events.append((event, data)))
    assert result.exports == {}
    assert result.details["skipped"] == {"ctranslate2-float32": "ctranslate2 is not installed (test)",
                                 "ctranslate2-int8": "ctranslate2 is not installed (test)"}
    assert events[0] == ("skipped", {"export": "ctranslate2-float32", "reason": "ctranslate2 is not installed (test)"})
    assert not any(tmp_path.iterdir())  # nothing written when nothing can be built


def test_on_export_through_the_host_returns_an_export_result(builtin_model, tokenizer, tmp_path, monkeypatch):
    """What the core's report reads: `exports` and the details (`skipped`, ...) side by side."""
    monkeypatch.setattr(plugin.engine_module("ctranslate2"), "missing", lambda: "not here (test)")
    host = make_host({"runtimes": plugin})
    host.settings["runtimes"] = RuntimesSettings(engines=["ctranslate2"], ctranslate2=["int8"])
    result = host.call_each("on_export", ["runtimes"], fallback=False, model=builtin_model, tokenizer=tokenizer,
                            export_dir=tmp_path, config=None)["runtimes"]
    assert isinstance(result, ExportResult) and result.exports == {} and result.backends == {}
    assert result.report() == {"exports": {}, "skipped": {"ctranslate2-int8": "not here (test)"}, "sizes_bytes": {},
                               "parity": {}, "tokenizer": {}}


def test_an_existing_directory_that_is_not_ours_is_left_alone(builtin_model, tokenizer, tmp_path):
    if plugin.engine_module("ctranslate2").missing():
        pytest.skip("ctranslate2 is not installed")
    (tmp_path / "ctranslate2-int8").mkdir()
    (tmp_path / "ctranslate2-int8" / "notes.txt").write_text("mine")
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["ctranslate2"]))
    assert "not written by this plugin" in result.details["skipped"]["ctranslate2-int8"]
    assert (tmp_path / "ctranslate2-int8" / "notes.txt").read_text() == "mine"
    assert "ctranslate2-float32" in result.exports


def test_load_backend_answers_only_for_its_own_directories(tmp_path):
    assert load_backend(tmp_path) is None  # no runtime.json: another plugin's export
    (tmp_path / "export.json").write_text(json.dumps({"format": "ryzen-onnx/1"}))
    assert load_backend(tmp_path) is None
    write_manifest(tmp_path, "tensorrt", "fp8", name="tensorrt-fp8")
    with pytest.raises(RuntimeExportError, match="unknown engine 'tensorrt'"):
        load_backend(tmp_path)
    (tmp_path / "runtime.json").write_text("{not json")
    with pytest.raises(RuntimeExportError, match="cannot read"):
        load_backend(tmp_path)


def test_an_export_that_disagrees_with_torch_is_dropped_with_the_reason(builtin_model, tokenizer, tmp_path,
                                                                        monkeypatch):
    if plugin.engine_module("ctranslate2").missing():
        pytest.skip("ctranslate2 is not installed")
    module = plugin.engine_module("ctranslate2")
    right = module.CTranslate2Backend.logits
    monkeypatch.setattr(module.CTranslate2Backend, "logits", lambda self, ids: right(self, ids) + 0.01)
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["ctranslate2"]))
    # An offset keeps the top token (int8 stays), but is past the fp32 tolerance.
    assert list(result.exports) == ["ctranslate2-int8"]
    assert "dropped, max |logit difference| 0.01 > fp32_tolerance 0.001" in result.details["skipped"]["ctranslate2-float32"]
    assert not (tmp_path / "ctranslate2-float32").exists()
    monkeypatch.setattr(module.CTranslate2Backend, "logits", lambda self, ids: -right(self, ids))
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["ctranslate2"], min_top1=0.9))
    assert result.exports == {} and "top-1 agreement 0.00 < min_top1 0.9" in result.details["skipped"]["ctranslate2-int8"]


def test_an_export_that_fails_to_run_is_dropped_with_the_engines_own_words(builtin_model, tokenizer, tmp_path,
                                                                           monkeypatch):
    if plugin.engine_module("ctranslate2").missing():
        pytest.skip("ctranslate2 is not installed")
    module = plugin.engine_module("ctranslate2")

    def fails_at_batch_two(self, ids):
        raise RuntimeError("Exception from engine.cpp:224:\n[cpu] reshape conflicts with the pattern")

    monkeypatch.setattr(module.CTranslate2Backend, "logits", fails_at_batch_two)
    settings = RuntimesSettings(engines=["ctranslate2"], ctranslate2=["int8"])
    result = export_all(builtin_model, tokenizer, tmp_path, settings)
    assert result.details["skipped"]["ctranslate2-int8"] == ("dropped, it fails on a batch of 2: RuntimeError: "
                                                     "[cpu] reshape conflicts with the pattern")


def test_a_converter_that_raises_is_skipped_and_the_other_engines_go_on(builtin_model, tokenizer, tmp_path,
                                                                        monkeypatch):
    if plugin.engine_module("ctranslate2").missing():
        pytest.skip("ctranslate2 is not installed")
    module = plugin.engine_module("ctranslate2")
    convert = module.export

    def int8_breaks(source, out_dir, precision, details):
        if precision == "int8":
            raise OSError("disk full")
        return convert(source, out_dir, precision, details)

    monkeypatch.setattr(module, "export", int8_breaks)
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["ctranslate2"]))
    assert list(result.exports) == ["ctranslate2-float32"]
    assert result.details["skipped"] == {"ctranslate2-int8": "the ctranslate2 conversion failed: OSError: disk full"}
    assert not (tmp_path / "ctranslate2-int8").exists()


def test_a_bfloat16_model_is_written_as_float32_and_left_unchanged(llama_model, tokenizer, tmp_path):
    import copy

    model = copy.deepcopy(llama_model).to(torch.bfloat16)
    write_hf_source(model, tokenizer, tmp_path)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
