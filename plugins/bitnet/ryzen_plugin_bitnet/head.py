"""The LM head of the ternary inference model in int8: BitNet trains it in full precision, and at a vocabulary
of thousands it is the largest matrix a decode step reads (8192 x 768 in fp32 is 25 MB, more than the 2-bit
codes of all twelve layers of a 100M model). In int8 it reads a quarter of that.

The head becomes torch's dynamic int8 Linear (fbgemm/oneDNN through `quantize_dynamic`): int8 weights with a
scale per output row, activations quantized per call. Only the inference copy changes; training and the
packed file keep the fp32 head. Where torch no longer has that path the head stays fp32 and a warning says why.
"""
from __future__ import annotations

import logging
import warnings

import torch.nn as nn

INT8 = "int8 (per-row weights, dynamic activations)"
log = logging.getLogger(__name__)


def head_kind(model: nn.Module) -> str:
    """What `model`'s LM head is: INT8, `fp32`, or `none` (no `lm_head` module)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        return "none"
    return INT8 if hasattr(head, "_packed_params") else "fp32"


def quantize_head(model: nn.Module) -> None:
    """Replace `model.lm_head` (a Linear: the built-in Transformer's and HF causal LMs') with a dynamic int8
    one, in place; where torch cannot, it stays fp32 and a warning says why."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices, every call
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
            plain.load_state_dict(head.state_dict())  # a copy: the weight may be tied to the embedding
            quantized = quantize_dynamic(nn.Sequential(plain), {nn.Linear: per_channel_dynamic_qconfig})[0]
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.warning("bitnet: the LM head stays fp32: torch's dynamic int8 Linear is unavailable (%s: %s)",
                    type(exc).__name__, str(exc).splitlines()[0][:120])
        return
    model.lm_head = quantized
