"""Attention computed against the quantized cache itself, without writing dequantized keys or values.

Keys are stored per channel: K[t, d] = s[g(t), d] * c[t, d] + m[g(t), d], so
    q . K[t] = sum_d (q[d] * s[g, d]) * c[t, d] + sum_d q[d] * m[g, d]
— the scales fold into the query (one small tensor per group) and the minima into one offset per group.
Values are stored per token: V[t, d] = s[t, g(d)] * c[t, d] + m[t, g(d)], so
    sum_t p[t] V[t, d] = sum_t (p[t] * s[t, g]) * c[t, d] + sum_t p[t] * m[t, g]
— the scales fold into the attention weights. What remains per step is a matmul against the codes, turned
to fp32 one layer at a time; 4-bit codes are multiplied nibble by nibble, never unpacked into a tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quantize import QuantizedTensor


def _times_codes(weights: torch.Tensor, quantized: QuantizedTensor) -> torch.Tensor:
    """weights [..., n, K] @ codes [..., K, N] -> [..., n, N]; 4-bit codes are packed along N."""
    codes = quantized.codes
    if quantized.bits == 8:
        return weights @ codes.float()
    low, high = weights @ (codes & 0x0F).float(), weights @ (codes >> 4).float()
    return torch.stack([low, high], dim=-1).flatten(-2)


def key_scores(q: torch.Tensor, keys: QuantizedTensor) -> torch.Tensor:
    """q [B, H, n, D] . quantized keys (codes [B, H, groups, D, group tokens]) -> [B, H, n, tokens]."""
    scale = keys.scale.squeeze(-1).float()  # [B, H, groups, D]
    minimum = keys.minimum.squeeze(-1).float()
    scaled_q = q.unsqueeze(2) * scale.unsqueeze(3)  # [B, H, groups, n, D]
    offset = (q @ minimum.transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)  # [B, H, groups, n, 1]
    scores = _times_codes(scaled_q, keys) + offset  # [B, H, groups, n, group tokens]
    return scores.transpose(2, 3).flatten(3)


def weighted_values(weights: torch.Tensor, values: QuantizedTensor) -> torch.Tensor:
    """weights [B, H, n, tokens] @ quantized values (codes [B, H, groups, tokens, group channels]) -> [B, H, n, D]."""
    scale = values.scale.float()  # [B, H, groups, tokens, 1]
    scaled_weights = weights.unsqueeze(2) * scale.transpose(-1, -2)  # [B, H, groups, n, tokens]
    offset = weights.unsqueeze(2) @ values.minimum.float()  # [B, H, groups, n, 1]
    out = _times_codes(scaled_weights, values) + offset  # [B, H, groups, n, group channels]
    return out.transpose(2, 3).flatten(3)


def causal_mask(new: int, total: int, device) -> torch.Tensor | None:
    """[new, total] bool: query i (the i-th of the last `new` positions) sees keys 0 .. total - new + i."""
    if new == 1:
        return None
    return torch.ones(new, total, dtype=torch.bool, device=device).tril(diagonal=total - new)


def attend_quantized(q: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor,
                     recent_keys: torch.Tensor, recent_values: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, H, n, D] (the last n of the recent tokens) over the quantized tokens
    followed by the fp32 recent ones [B, H, R, D]: [B, H, n, D]."""
    new, quantized_tokens = q.shape[2], values.codes.shape[3]
    recent_scores = q @ recent_keys.transpose(-1, -2)
    mask = causal_mask(new, recent_keys.shape[2], q.device)
    if mask is not None:
        recent_scores = recent_scores.masked_fill(~mask, float("-inf"))
    scores = torch.cat([key_scores(q, keys), recent_scores], dim=-1) * (1 / math.sqrt(q.shape[-1]))
    weights = scores.softmax(dim=-1)
    return (weighted_values(weights[..., :quantized_tokens], values)
            + weights[..., quantized_tokens:] @ recent_values)


def attend_fp32(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What the built-in Transformer computes: SDPA, causal for the last n = q's length positions."""
    new, total = q.shape[2], keys.shape[2]
    if new == total and new > 1:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_mask(new, total, q.device))
