"""The training forward that `transform_forward` plugins wrap.

A forward maps a batch (input ids, target ids) to a ForwardOutput. The trainer
backpropagates `loss`; plugins may add terms to it using the logits or hidden state.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class ForwardOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None

    def with_loss(self, loss: torch.Tensor) -> "ForwardOutput":
        return replace(self, loss=loss)


Forward = Callable[[torch.Tensor, torch.Tensor], ForwardOutput]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def reference_forward(model: torch.nn.Module) -> Forward:
    """Plain fp32 forward with next-token cross-entropy, for the built-in model and HF causal LMs."""
    from .models import is_hf_model

    hf = is_hf_model(model)

    def forward(input_ids: torch.Tensor, targets: torch.Tensor) -> ForwardOutput:
        if hf:
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
            logits, hidden = out.logits, out.hidden_states[-1]
        else:
            out = model(input_ids)
            logits, hidden = out.logits, out.hidden
        return ForwardOutput(next_token_loss(logits, targets), logits, hidden)

    return forward
