"""A KV cache whose older tokens are stored quantized (KIVI layout) and whose newest stay in fp32.

Per layer: keys are quantized per channel — each group of `group_size` tokens gets one scale per channel,
stored transposed [B, heads, head_dim, tokens] so the group runs along the last dimension — because key
outliers sit in fixed channels; values per token — one scale per `group_size` channels of each token.
Tokens enter the fp32 residual and move to the quantized part a whole key group at a time once more than
`residual` of them wait. Reading dequantizes the quantized part and appends the residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import QuantizedTensor, quantize


@dataclass
class LayerCache:
    keys: QuantizedTensor | None  # [B, heads, head_dim, quantized tokens], groups along tokens
    values: QuantizedTensor | None  # [B, heads, quantized tokens, head_dim], groups along channels
    recent_keys: torch.Tensor  # [B, heads, residual tokens, head_dim], full precision
    recent_values: torch.Tensor

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            return self.recent_keys, self.recent_values
        keys = self.keys.dequantize().transpose(-1, -2)
        return (torch.cat([keys, self.recent_keys], dim=2),
                torch.cat([self.values.dequantize(), self.recent_values], dim=2))

    @property
    def nbytes(self) -> int:
        stored = [t.nbytes for t in (self.keys, self.values) if t is not None]
        return sum(stored) + sum(t.numel() * t.element_size() for t in (self.recent_keys, self.recent_values))


class QuantizedKVCache:
    """`bits` 8 or 4; `residual` None keeps everything in full precision (the reference cache)."""

    def __init__(self, bits: int = 8, group_size: int = 32, residual: int | None = 32):
        if group_size % 2:
            raise ValueError(f"group_size must be even, got {group_size}")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.layers: list[LayerCache] = []

    def __len__(self) -> int:
        """Tokens held."""
        if not self.layers:
            return 0
        layer = self.layers[0]
        quantized = 0 if layer.values is None else layer.values.codes.shape[2]
        return quantized + layer.recent_keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def read(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every layer's (keys, values) [B, heads, tokens, head_dim], dequantized; None while empty."""
        return [layer.read() for layer in self.layers] if self.layers else None

    def append(self, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add each layer's new (keys, values) [B, heads, new tokens, head_dim]."""
        if not self.layers:
            self.layers = [LayerCache(None, None, k[:, :, :0], v[:, :, :0]) for k, v in new]
        for layer, (k, v) in zip(self.layers, new):
            layer.recent_keys = torch.cat([layer.recent_keys, k], dim=2)
            layer.recent_values = torch.cat([layer.recent_values, v], dim=2)
            self._quantize_oldest(layer)

    def _quantize_oldest(self, layer: LayerCache) -> None:
        if self.residual is None:
            return
        waiting = layer.recent_keys.shape[2] - self.residual
        moving = (waiting // self.group_size) * self.group_size
        if moving <= 0:
            return
        old_keys, layer.recent_keys = layer.recent_keys[:, :, :moving], layer.recent_keys[:, :, moving:]
        old_values, layer.recent_values = layer.recent_values[:, :, :moving], layer.recent_values[:, :, moving:]
        keys = quantize(old_keys.transpose(-1, -2), self.bits, self.group_size)
        values = quantize(old_values, self.bits, self.value_group(old_values.shape[-1]))
        # Slices of the residual would keep its whole buffer alive; own copies let it be freed.
        layer.recent_keys, layer.recent_values = layer.recent_keys.clone(), layer.recent_values.clone()
        layer.keys = keys if layer.keys is None else layer.keys.cat(keys, dim=-1)
        layer.values = values if layer.values is None else layer.values.cat(values, dim=2)

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: `group_size`, or the whole head when that does not divide it."""
        return self.group_size if head_dim % self.group_size == 0 else head_dim

    def full_precision_nbytes(self, element_size: int = 4) -> int:
        """What the same tokens take in an unquantized cache of `element_size`-byte elements."""
        return sum(2 * layer.recent_keys[:, :, :1].numel() * len(self) * element_size for layer in self.layers)
