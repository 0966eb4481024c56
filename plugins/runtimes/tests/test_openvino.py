"""OpenVINO: the onnx plugin's fp32 export converted to IR, run by our decode loop."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import lm_logits
from ryzen_plugin_runtimes.plugin import RuntimesSettings, export_all, load_backend

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ryzen-plugin-runtimes[openvino]')")
onnx_export = pytest.importorskip("ryzen_plugin_onnx_export.export", reason="the onnx plugin is not installed")


@pytest.fixture(scope="module")
def exported(builtin_model, tokenizer, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export")
    onnx_export.export_onnx(builtin_model, tokenizer, export_dir / "onnx-fp32")
    return export_all(builtin_model, tokenizer, export_dir, RuntimesSettings(engines=["openvino"]))


def test_fp32_follows_torch(exported, builtin_model, follows_torch):
    follows_torch(load_backend(exported.exports["openvino-fp32"]), builtin_model, atol=1e-4)


def test_weight_compression_is_built_or_skipped_with_the_reason(exported, builtin_model, prompts):
    for name in ("openvino-int8", "openvino-int4"):
        if name in exported.details["skipped"]:
            assert "nncf" in exported.details["skipped"][name]
            continue
        backend = load_backend(exported.exports[name])
        with torch.inference_mode():
            expected = lm_logits(builtin_model, prompts)
        assert (backend.logits(prompts).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.6


def test_without_the_onnx_export_openvino_is_skipped_with_the_reason(builtin_model, tokenizer, tmp_path):
    result = export_all(builtin_model, tokenizer, tmp_path, RuntimesSettings(engines=["openvino"], openvino=["fp32"]))
    assert result.exports == {}
    assert "--plugins onnx,runtimes" in result.details["skipped"]["openvino-fp32"]
