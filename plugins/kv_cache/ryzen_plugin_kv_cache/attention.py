"""Attention computed against the quantized cache itself, without writing dequantized keys or values.

Keys stored per channel: K[t, d] = s[g(t), d] * c[t, d] + m[g(t), d], so
    q . K[t] = sum_d (q[d] * s[g(t), d]) * c[t, d] + sum_d q[d] * m[g(t), d]
— the scales fold into one scaled query per group, the minima into one offset per group: one batched
matmul of each group's scaled query by that group's codes. (Multiplying all codes by all G scaled queries
and keeping each token's own group, as an earlier version did, costs G times the multiply-adds: 2-6x slower
here from 1k tokens on, measured.)
Keys stored per token (int8's default) and values: X[t, d] = s[t, g(d)] * c[t, d] + m[t, g(d)] (m the offset
of code 0: an fp16 minimum or -zero point * scale), so for keys
    q . K[t] = sum_g s[t, g] * (q_g . c[t, g]) + sum_g m[t, g] * sum(q_g)
— one matmul of the codes by the query laid out block-diagonally over the G channel groups ([D, G]).
Values are stored per token: V[t, d] = s[t, g(d)] * c[t, d] + m[t, g(d)], so
    sum_t p[t] V[t, d] = sum_t (p[t] * s[t, g(d)]) * c[t, d] + sum_t p[t] * m[t, g(d)]
— the scales fold into the attention weights, one weighted row per channel group.
What remains per step is the codes turned to fp32, one layer at a time, and those matmuls; 4-bit codes are
multiplied nibble by nibble (even and odd channels), never unpacked into a tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quantize import QuantizedTensor


def _times_codes(rows: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """rows [..., M, D] @ codes [..., T, D (/2 if 4-bit, channels packed in pairs)]^T -> [..., M, T]."""
    if bits == 8:
        return rows @ codes.float().transpose(-1, -2)
    # Strided (every other channel) rows send the batched matmul down a path several times slower.
    even, odd = rows[..., 0::2].contiguous(), rows[..., 1::2].contiguous()
    return even @ (codes & 0x0F).float().transpose(-1, -2) + odd @ (codes >> 4).float().transpose(-1, -2)


def _codes_times(weights: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """weights [..., M, T] @ codes [..., T, C (/2 if 4-bit)] -> [..., M, C]."""
    if bits == 8:
        return weights @ codes.float()
    even, odd = weights @ (codes & 0x0F).float(), weights @ (codes >> 4).float()
    return torch.stack([even, odd], dim=-1).flatten(-2)


def key_scores(q: torch.Tensor, keys: QuantizedTensor) -> torch.Tensor:
    """q [B, H, 1, D] . quantized keys -> [B, H, 1, tokens]; keys per channel (codes [B, H, groups, group
    tokens, D]) or per token (codes [B, H, tokens, channel groups, group channels])."""
    if keys.dim == -1:
        return per_token_key_scores(q, keys)
    query = q.unsqueeze(2)  # [B, H, 1, 1, D] against scales and minima [B, H, groups, 1, D]
    per_group = _times_codes(query * keys.scale.float(), keys.codes, keys.bits)  # [B, H, groups, 1, group tokens]
    offset = (query * keys.offset()).sum(-1, keepdim=True)  # [B, H, groups, 1, 1]
    return (per_group + offset).flatten(2).unsqueeze(2)


def per_token_key_scores(q: torch.Tensor, keys: QuantizedTensor) -> torch.Tensor:
    """q [B, H, 1, D] . keys quantized per token (codes [B, H, tokens, G, C]) -> [B, H, 1, tokens]."""
    groups = keys.scale.shape[3]
    rows = q if groups == 1 else q * torch.eye(groups, dtype=q.dtype).repeat_interleave(q.shape[-1] // groups, dim=1)
    dots = _times_codes(rows, keys.codes.flatten(3), keys.bits).transpose(-1, -2)  # [B, H, tokens, G]
    query_sums = q.unflatten(-1, (groups, -1)).sum(-1)  # [B, H, 1, G]
    # The stored fp16 / uint8 metadata enter the fp32 arithmetic directly (type promotion), with no
    # converted copy: every pass over [B, H, tokens] is one more parallel region, which costs the most
    # when the machine is shared.
    scale = keys.scale.squeeze(-1)
    if keys.zero_point is not None:  # s * (q . c - z * sum(q))
        scores = torch.addcmul(dots, keys.zero_point.squeeze(-1), -query_sums).mul_(scale)
    else:  # s * (q . c) + m * sum(q)
        scores = torch.addcmul(keys.minimum.squeeze(-1) * query_sums, dots, scale)
    return (scores if groups == 1 else scores.sum(-1, keepdim=True)).transpose(-1, -2)


def weighted_values(weights: torch.Tensor, values: QuantizedTensor) -> torch.Tensor:
    """weights [B, H, 1, tokens] @ quantized values (codes [B, H, tokens, groups, group channels]) -> [B, H, 1, D]."""
    groups = values.scale.shape[3]
    per_token = weights.transpose(-1, -2)  # [B, H, T, 1]
    scaled = per_token * values.scale.squeeze(-1)  # p * s: [B, H, T, groups]
    every_group = _codes_times(scaled.transpose(-1, -2), values.codes.flatten(3), values.bits)  # [B, H, groups, groups * C]
    own_group = every_group.unflatten(-1, (groups, -1)).diagonal(dim1=2, dim2=3).transpose(-1, -2)  # [B, H, groups, C]
    if values.zero_point is not None:  # sum_t p s (c - z)
        offset = -(scaled * values.zero_point.squeeze(-1)).sum(2)  # [B, H, groups]
    else:  # sum_t p (s c + m)
        offset = (per_token * values.minimum.squeeze(-1)).sum(2)
    return (own_group + offset.unsqueeze(-1)).flatten(2).unsqueeze(2)


def causal_mask(new: int, total: int, device) -> torch.Tensor | None:
    """[new, total] bool: query i (the i-th of the last `new` positions) sees keys 0 .. total - new + i."""
    if new == 1:
        return None
    return torch.ones(new, total, dtype=torch.bool, device=device).tril(diagonal=total - new)


def attend_quantized(q: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor,
                     recent_keys: torch.Tensor, recent_values: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one new query q [B, H, 1, D] (the last of the recent tokens) over the quantized
    tokens followed by the recent ones [B, H, R, D] (fp16 or fp32, read as fp32): [B, H, 1, D]."""
    if q.shape[2] != 1:
        raise ValueError(f"attention against the codes takes one query per row, got {q.shape[2]}")
    quantized_tokens = values.codes.shape[2]
    q = q * (1 / math.sqrt(q.shape[-1]))  # on the query: one pass fewer over the scores
    scores = torch.cat([key_scores(q, keys), q @ recent_keys.float().transpose(-1, -2)], dim=-1)
    weights = scores.softmax(dim=-1)
    return (weighted_values(weights[..., :quantized_tokens], values)
            + weights[..., quantized_tokens:] @ recent_values.float())


def attend_fp32(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What the built-in Transformer computes: SDPA, causal for the last n = q's length positions."""
    new, total = q.shape[2], keys.shape[2]
    if new == total and new > 1:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_mask(new, total, q.device))
