"""Ryzen ONNX plugin: a fused export with an in-place KV cache, weight-only int8/int4, parity gate,
and generation in onnxruntime.

The public names below are imported lazily: the package is imported whenever the `ryzen`
command starts (entry point), and torch/onnx must not load unless they are used.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "export_onnx": ".export",
    "quantize_int8": ".export",
    "read_manifest": ".export",
    "ExportError": ".export",
    "OrtBackend": ".runtime",
    "FusedOrtBackend": ".runtime",
    "load_export": ".runtime",
    "export_fused": ".fused_export",
    "quantize_weights": ".fused_export",
    "build_graph": ".graph_builder",
    "UnsupportedModel": ".graph_builder",
    "check_parity": ".parity",
    "measure_parity": ".parity",
    "parity_token_ids": ".parity",
    "ParityError": ".parity",
    "OnnxSettings": ".plugin",
    "export_and_check": ".plugin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
