"""A KV cache whose older tokens are stored quantized (KIVI layout) and whose newest stay in fp32.

Per layer, keys are quantized per channel — each group of `group_size` tokens gets one fp16 scale and
minimum per channel — because key outliers sit in fixed channels; codes [B, heads, groups, group_size,
head_dim], scales [B, heads, groups, 1, head_dim]. Values are quantized per token — one fp16 scale and
minimum per `value_group_size` channels of each token; codes [B, heads, tokens, channel groups, channels
per group], scales [B, heads, tokens, channel groups, 1]. Both grow along dim 2. Tokens
enter the fp32 residual and move to the quantized part a whole key group at a time, when `flush()` finds
more than `residual` of them waiting (once per forward). Each group is quantized once and never rewritten.

Reading, per layer and only while that layer's attention runs:
- `attend` ("direct"): a single new query's attention computed against the codes (attention.py); no
  dequantized keys or values are written (the codes of one layer are turned to fp32 while it runs). Several
  new queries at once (a prompt after a cached one) read a freshly dequantized layer instead.
- `keys_values` ("dequantize"): the quantized part is dequantized into a scratch buffer that every layer
  reuses, followed by the fp32 residual; HF models get these (their attention is their own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import attend_fp32, attend_quantized
from .quantize import QuantizedTensor, quantize

READS = ("direct", "dequantize")


@dataclass
class LayerCache:
    keys: QuantizedTensor | None  # codes [B, heads, groups, group tokens, head_dim (/2 if 4-bit)]
    values: QuantizedTensor | None  # codes [B, heads, tokens, channel groups, group channels (/2 if 4-bit)]
    recent_keys: torch.Tensor  # [B, heads, residual tokens, head_dim], fp32
    recent_values: torch.Tensor

    @property
    def quantized_tokens(self) -> int:
        return 0 if self.values is None else self.values.codes.shape[2]

    def __len__(self) -> int:
        return self.quantized_tokens + self.recent_keys.shape[2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized part as fp32 (keys, values) [B, heads, tokens, head_dim], freshly allocated."""
        if self.keys is None:
            return None
        return self.keys.dequantize().flatten(2, 3), self.values.dequantize().flatten(-2)

    def dequantize_into(self, scratch_keys: torch.Tensor, scratch_values: torch.Tensor) -> None:
        """Write the quantized part, dequantized, into scratch[:, :, :quantized tokens] ([B, heads, ≥T, D])."""
        tokens = self.quantized_tokens
        key_view = scratch_keys[:, :, :tokens].unflatten(2, (self.keys.scale.shape[2], -1))
        torch.mul(self.keys.unpacked_codes(), self.keys.scale.float(), out=key_view)
        key_view.add_(self.keys.minimum.float())
        value_view = scratch_values[:, :, :tokens].unflatten(-1, (self.values.scale.shape[3], -1))
        torch.mul(self.values.unpacked_codes(), self.values.scale.float(), out=value_view)
        value_view.add_(self.values.minimum.float())

    @property
    def nbytes(self) -> int:
        stored = [t.nbytes for t in (self.keys, self.values) if t is not None]
        return sum(stored) + sum(t.numel() * t.element_size() for t in (self.recent_keys, self.recent_values))


class QuantizedKVCache:
    """`bits` 8 or 4; `residual` None keeps everything in fp32 (the reference cache). `value_group_size`
    0: one value group per head. `read`: "direct" or "dequantize" (module docstring)."""

    def __init__(self, bits: int = 8, group_size: int = 128, residual: int | None = 0, value_group_size: int = 0,
                 read: str = "direct"):
        if group_size % 2 or value_group_size % 2:
            raise ValueError(f"group sizes must be even, got {group_size} and {value_group_size}")
        if read not in READS:
            raise ValueError(f"read must be one of {READS}, got {read!r}")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.value_group_size, self.read = value_group_size, read
        self.layers: list[LayerCache] = []
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        """Tokens held."""
        return len(self.layers[0]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors stored: codes, fp16 scales and minima, the fp32 residual (not the scratch)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def scratch_nbytes(self) -> int:
        return 0 if self._scratch is None else sum(t.numel() * t.element_size() for t in self._scratch)

    @property
    def fp32_tokens(self) -> int:
        return self.layers[0].recent_keys.shape[2] if self.layers else 0

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """Add layer `index`'s new keys/values [B, heads, new tokens, head_dim] to its fp32 residual."""
        if index == len(self.layers):
            self.layers.append(LayerCache(None, None, keys[:, :, :0].float(), values[:, :, :0].float()))
        layer = self.layers[index]
        layer.recent_keys = torch.cat([layer.recent_keys, keys.float()], dim=2)
        layer.recent_values = torch.cat([layer.recent_values, values.float()], dim=2)
        return layer

    def attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Append layer `index`'s new keys/values and return the attention of q [B, heads, new, head_dim] over
        everything the layer holds: [B, heads, new, head_dim]."""
        layer = self.append(index, keys, values)
        query = q.float()  # the cache is fp32 whatever the model's dtype; the output goes back to it
        if layer.keys is None:
            out = attend_fp32(query, layer.recent_keys, layer.recent_values)
        elif self.read == "dequantize":
            out = attend_fp32(query, *self.keys_values(index))
        elif q.shape[2] == 1:
            out = attend_quantized(query, layer.keys, layer.values, layer.recent_keys, layer.recent_values)
        else:
            keys, values = layer.dequantized()
            out = attend_fp32(query, torch.cat([keys, layer.recent_keys], 2), torch.cat([values, layer.recent_values], 2))
        return out.to(q.dtype)

    def keys_values(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (keys, values) [B, heads, tokens, head_dim]: the quantized part dequantized into the
        shared scratch buffer (valid until the next layer is read), then the residual."""
        layer = self.layers[index]
        if layer.keys is None:
            return layer.recent_keys, layer.recent_values
        tokens, quantized = len(layer), layer.quantized_tokens
        scratch_keys, scratch_values = self._scratch_for(layer.recent_keys, tokens)
        layer.dequantize_into(scratch_keys, scratch_values)
        scratch_keys[:, :, quantized:tokens].copy_(layer.recent_keys)
        scratch_values[:, :, quantized:tokens].copy_(layer.recent_values)
        return scratch_keys[:, :, :tokens], scratch_values[:, :, :tokens]

    def _scratch_for(self, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, head_dim = like.shape
        if self._scratch is None or self._scratch[0].shape[2] < tokens or self._scratch[0].shape[:2] != (batch, heads):
            capacity = max(tokens, int(1.25 * tokens) // self.group_size * self.group_size)
            self._scratch = tuple(like.new_empty(batch, heads, capacity, head_dim) for _ in range(2))
        return self._scratch

    def flush(self) -> None:
        """Quantize, in every layer, the oldest whole key groups beyond the `residual` newest tokens."""
        if self.residual is None:
            return
        for layer in self.layers:
            moving = (layer.recent_keys.shape[2] - self.residual) // self.group_size * self.group_size
            if moving > 0:
                self._quantize_oldest(layer, moving)

    def _quantize_oldest(self, layer: LayerCache, moving: int) -> None:
        old_keys, old_values = layer.recent_keys[:, :, :moving], layer.recent_values[:, :, :moving]
        # Slices of the residual would keep its whole buffer alive; own copies let it be freed.
        layer.recent_keys = layer.recent_keys[:, :, moving:].clone()
        layer.recent_values = layer.recent_values[:, :, moving:].clone()
        # keys [B, H, T, D] -> [B, H, groups, group tokens, D], grouped over the tokens: per channel
        keys = quantize(old_keys.unflatten(2, (-1, self.group_size)), self.bits, dim=-2)
        # values [B, H, T, D] -> [B, H, T, channel groups, group channels], grouped over channels: per token
        values = quantize(old_values.unflatten(-1, (-1, self.value_group(old_values.shape[-1]))), self.bits, dim=-1)
        layer.keys = keys if layer.keys is None else layer.keys.cat(keys, dim=2)
        layer.values = values if layer.values is None else layer.values.cat(values, dim=2)

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: `value_group_size`, or the whole head when it is 0 or does not divide it."""
        size = self.value_group_size
        return size if size and head_dim % size == 0 else head_dim

    def full_precision_nbytes(self, element_size: int = 4) -> int:
        """What the same tokens take in an unquantized cache of `element_size`-byte elements."""
        # batch x heads x head_dim elements per token, from the residual's shape (it may hold no token)
        return sum(2 * math.prod(layer.recent_keys.shape[:2]) * layer.recent_keys.shape[3] * len(layer) * element_size
                   for layer in self.layers)

    def dequantized_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every layer's (keys, values) [B, heads, tokens, head_dim] as fp32, freshly allocated (for tests
        and inspection; decoding reads through `attend` or `keys_values`)."""
        if not self.layers:
            return None
        out = []
        for layer in self.layers:
            quantized = layer.dequantized() or (layer.recent_keys[:, :, :0], layer.recent_values[:, :, :0])
            out.append((torch.cat([quantized[0], layer.recent_keys], 2), torch.cat([quantized[1], layer.recent_values], 2)))
        return out
