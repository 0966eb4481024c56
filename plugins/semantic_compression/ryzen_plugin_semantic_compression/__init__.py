"""Ryzen compression plugin: smaller representations and activations, measured against quality.

The hooks are methods of `plugin.CompressionPlugin` (entry point `compression`), the commands live in
`cli`; the techniques can also be used alone.
Names load on first use, so importing the plugin (every `ryzen` start) does not import torch.
"""
from importlib import import_module

_LAZY = {
    "matryoshka_loss": "matryoshka", "nested_weights": "matryoshka", "truncated_head": "matryoshka",
    "BinaryCodec": "quantization", "Int8Codec": "quantization", "QuantizedIndex": "quantization",
    "load_index": "quantization", "save_index": "quantization",
    "PeakTensorBytes": "saved_activations", "compressed_saved_activations": "saved_activations",
    "TopKMLP": "sparse", "apply_topk": "sparse", "keep_top_k": "sparse",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
