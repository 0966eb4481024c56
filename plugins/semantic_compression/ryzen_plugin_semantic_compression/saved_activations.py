"""Store the tensors autograd saves for backward in bf16, halving activation memory in training."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def compressed_saved_activations(dtype: torch.dtype = torch.bfloat16, min_elements: int = 1024):
    """Inside this context, saved float32 tensors of at least `min_elements` are kept as `dtype`.

    Small tensors (norm statistics, scalars) stay exact: compressing them saves nothing and costs accuracy.
    Parameters are left alone: autograd saves them by reference, so a copy would add memory, not save it.
    """

    def pack(t: torch.Tensor):
        if t.dtype == torch.float32 and t.numel() >= min_elements and not isinstance(t, torch.nn.Parameter):
            return ("compressed", t.to(dtype))
        return ("exact", t)

    def unpack(packed):
        kind, t = packed
        return t.to(torch.float32) if kind == "compressed" else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
