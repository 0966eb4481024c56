"""Matryoshka representation learning for a language model.

Training adds, for each prefix size m of the final hidden state, the next-token loss of
the LM head applied to the first m dimensions only: logits_m = h[:, :m] @ W[:, :m]^T.
The weighted mean of those losses (the full size included) pushes the most useful
information into the leading dimensions, so at inference the head can run on a truncated
hidden state and pooled sentence embeddings can be cut to any of the trained prefixes.
The heads share W (the MRL-E variant of Kusupati et al., 2022): no parameters are added.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def prefix_sizes(width: int, divisors: Sequence[int]) -> list[int]:
    """Sorted distinct prefix sizes width // divisor (at least 1)."""
    if any(d < 1 for d in divisors):
        raise ValueError(f"Matryoshka divisors must be >= 1, got {list(divisors)}")
    return sorted({max(1, width // d) for d in divisors})


def nested_weights(width: int, divisors: Sequence[int],
                   weights: Sequence[float] | None = None) -> tuple[list[int], list[float]]:
    """Prefix sizes of the nested loss (the full width always among them) and each one's weight.

    Given weights follow `divisors`; divisors giving the same size add up. By default the
    full width weighs 1 and the smaller prefixes share another 1 equally: with equal weights
    the four small prefixes took 80% of the gradient and the full-width loss suffered for it.
    """
    sizes = prefix_sizes(width, [*divisors, 1])
    if weights is None:
        small = [s for s in sizes if s < width]
        return sizes, [1.0 if s == width else 1.0 / len(small) for s in sizes]
    if len(weights) != len(divisors):
        raise ValueError("need one Matryoshka weight per divisor")
    by_size = dict.fromkeys(sizes, 0.0)
    for divisor, weight in zip(divisors, weights):
        by_size[max(1, width // divisor)] += weight
    if by_size[width] == 0.0:
        by_size[width] = 1.0  # the model's own objective is never dropped
    return sizes, [by_size[s] for s in sizes]


def output_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear LM head to truncate")
    return head


def truncated_logits(hidden: torch.Tensor, head: nn.Linear, dims: int) -> torch.Tensor:
    return F.linear(hidden[..., :dims], head.weight[:, :dims], head.bias)


def matryoshka_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, full_loss: torch.Tensor,
                    sizes: Sequence[int], weights: Sequence[float], token_stride: int = 1) -> torch.Tensor:
    """Weighted mean over prefix sizes of the next-token loss; the full-width term is `full_loss`.

    The prefix terms are estimated on every `token_stride`-th position: each costs a full
    [tokens, vocab] logits matrix, and a strided sample is an unbiased estimate at a fraction
    of that cost.
    """
    width = hidden.shape[-1]
    sampled_hidden, sampled_targets = hidden[:, ::token_stride], targets[:, ::token_stride]
    total = hidden.new_zeros(())
    for size, weight in zip(sizes, weights):
        if size >= width:
            loss = full_loss
        else:
            logits = truncated_logits(sampled_hidden, head, size)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), sampled_targets.reshape(-1))
        total = total + weight * loss
    return total / sum(weights)


class TruncatedHead(nn.Module):
    """An LM head that reads only the first `dims` hidden dimensions (a contiguous slice of W)."""

    def __init__(self, head: nn.Linear, dims: int):
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(head.weight.detach()[:, :dims].contiguous(), requires_grad=False)
        self.bias = head.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden[..., :self.dims], self.weight, self.bias)


@contextlib.contextmanager
def truncated_head(model: nn.Module, dims: int | None):
    """Within the block, the model's `lm_head` uses only the first `dims` hidden dimensions."""
    head = output_head(model)
    if dims is None or dims >= head.in_features:
        yield model
        return
    if getattr(model, "lm_head", None) is not head:
        raise TypeError(f"{type(model).__name__} keeps its LM head elsewhere than `lm_head`")
    model.lm_head = TruncatedHead(head, dims)
    try:
        yield model
    finally:
        model.lm_head = head
