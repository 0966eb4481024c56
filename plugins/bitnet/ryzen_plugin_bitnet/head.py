"""The LM head of the ternary inference model in int8: BitNet trains it in full precision, and at a vocabulary
of thousands it is the largest matrix a decode step reads (8192 x 768 in fp32 is 25 MB, more than the 2-bit
codes of all twelve layers of a 100M model). In int8 it reads a quarter of that.

The head becomes torch's dynamic int8 Linear (fbgemm/oneDNN through `quantize_dynamic`): int8 weights with a
scale per output row, activations quantized per call. Only the inference copy changes; training and the
packed file keep the fp32 head. Where torch no longer has that path the head stays fp32 and the reason says so.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def output_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(the model's LM head Linear, its attribute name on the model), or None."""
    for name in ("lm_head",):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head, name
    return None


def quantize_head(model: nn.Module) -> str:
    """Replace `model`'s LM head with a dynamic int8 one, in place; returns what the head now is."""
    found = output_head(model)
    if found is None:
        return "fp32 (no lm_head Linear found)"
    head, name = found
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices, every call
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
            plain.load_state_dict(head.state_dict())  # a copy: the weight may be tied to the embedding
            quantized = quantize_dynamic(nn.Sequential(plain), {nn.Linear: per_channel_dynamic_qconfig})[0]
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"fp32 (int8 head unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    setattr(model, name, quantized)
    return "int8 (per-row weights, dynamic activations)"
