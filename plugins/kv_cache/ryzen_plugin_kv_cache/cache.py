"""A KV cache whose older tokens are stored quantized (KIVI layout) and whose newest stay in fp16.

Per layer, values are quantized per token — one fp16 scale and offset per `value_group_size` channels of
each token; codes [B, heads, tokens, channel groups, channels per group], scales [B, heads, tokens, channel
groups, 1]. Keys are quantized either per channel (KIVI; 4-bit's default) — each group of `group_size`
tokens gets one fp16 scale and minimum per channel, because key outliers sit in fixed channels; codes [B,
heads, groups, group_size, head_dim], scales [B, heads, groups, 1, head_dim] — or per token (int8's default)
in the values' layout. int8 per-token groups store a uint8 zero point instead of an fp16 minimum (quantize.py).
Both grow along dim 2. Tokens enter the full-precision window and move to the quantized part when `flush()`
(once per forward) finds more than `residual` of them waiting: per-channel keys a whole key group at a time,
per-token keys every token beyond the residual. Each group is quantized once and never rewritten.

The window is fp16 (`WINDOW_DTYPE`), as in KIVI: half of an fp32 window's bytes, which is what keeps the
whole cache near the quantized part's ratio to bf16, and 8 times finer than bf16 (10 mantissa bits against
7), so the window stays far more precise than an int8 code; it adds no range limit, the fp16 scales already
refusing values beyond fp16's range. The reference cache (`residual=None`) keeps everything in fp32.
Attention always runs in fp32.

Reading, per layer and only while that layer's attention runs:
- `attend` ("direct"): a single new query's attention computed against the codes (attention.py); no
  dequantized keys or values are written (the codes of one layer are turned to fp32 while it runs). Several
  new queries at once (a prompt after a cached one) read a freshly dequantized layer instead.
- `keys_values` ("dequantize"): the quantized part is dequantized into a scratch buffer that every layer
  reuses, followed by the window; HF models get these (their attention is their own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import attend_fp32, attend_quantized
from .quantize import QuantizedTensor, quantize

READS = ("direct", "dequantize")
KEY_GROUPINGS = ("channel", "token")
WINDOW_DTYPE = torch.float16


@dataclass
class LayerCache:
    keys: QuantizedTensor | None  # per channel: codes [B, heads, groups, group tokens, head_dim (/2 if 4-bit)];
    #                               per token: as values
    values: QuantizedTensor | None  # codes [B, heads, tokens, channel groups, group channels (/2 if 4-bit)]
    recent_keys: torch.Tensor  # the window [B, heads, window tokens, head_dim]: fp16 (fp32 in the reference cache)
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
        keys = self.keys.dequantize()
        return keys.flatten(-2) if self.keys.dim == -1 else keys.flatten(2, 3), self.values.dequantize().flatten(-2)

    def dequantize_into(self, scratch_keys: torch.Tensor, scratch_values: torch.Tensor) -> None:
        """Write the quantized part, dequantized, into scratch[:, :, :quantized tokens] ([B, heads, ≥T, D])."""
        tokens = self.quantized_tokens
        for part, scratch in ((self.keys, scratch_keys), (self.values, scratch_values)):
            if part.dim == -1:  # per token: [B, heads, tokens, channel groups, group channels]
                view = scratch[:, :, :tokens].unflatten(-1, (part.scale.shape[3], -1))
            else:  # per channel: [B, heads, groups, group tokens, head_dim]
                view = scratch[:, :, :tokens].unflatten(2, (part.scale.shape[2], -1))
            torch.mul(part.unpacked_codes(), part.scale.float(), out=view)
            view.add_(part.offset())

    @property
    def nbytes(self) -> int:
        stored = [t.nbytes for t in (self.keys, self.values) if t is not None]
        return sum(stored) + sum(t.numel() * t.element_size() for t in (self.recent_keys, self.recent_values))


class QuantizedKVCache:
    """`bits` 8 or 4; `residual` None keeps everything in fp32 (the reference cache). `key_grouping`
    "channel" or "token" (None: token for int8, channel for 4-bit); `group_size`: tokens per key group
    (per channel only). `value_group_size` 0: one value group per head (also per-token keys' channel
    groups). `read`: "direct" or "dequantize" (module docstring)."""

    def __init__(self, bits: int = 8, group_size: int = 128, residual: int | None = 0, value_group_size: int = 0,
                 read: str = "direct", key_grouping: str | None = None):
        if group_size % 2 or value_group_size % 2:
            raise ValueError(f"group sizes must be even, got {group_size} and {value_group_size}")
        if read not in READS:
            raise ValueError(f"read must be one of {READS}, got {read!r}")
        key_grouping = key_grouping or ("token" if bits == 8 else "channel")
        if key_grouping not in KEY_GROUPINGS:
            raise ValueError(f"key_grouping must be one of {KEY_GROUPINGS}, got {key_grouping!r}")
        self.key_grouping = key_grouping
        self.window_dtype = torch.float32 if residual is None else WINDOW_DTYPE
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.value_group_size, self.read = value_group_size, read
        self.layers: list[LayerCache] = []
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        """Tokens held."""
        return len(self.layers[0]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors stored: codes, fp16 scales, minima or zero points, the window (not the scratch)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def scratch_nbytes(self) -> int:
        return 0 if self._scratch is None else sum(t.numel() * t.element_size() for t in self._scratch)

    @property
    def window_tokens(self) -> int:
        """Tokens held unquantized (in `window_dtype`)."""
        return self.layers[0].recent_keys.shape[2] if self.layers else 0

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """Add layer `index`'s new keys/values [B, heads, new tokens, head_dim] to its window."""
        dtype = self.window_dtype
        if index == len(self.layers):
            self.layers.append(LayerCache(None, None, keys[:, :, :0].to(dtype), values[:, :, :0].to(dtype)))
        layer = self.layers[index]
        new_keys, new_values = keys.to(dtype), values.to(dtype)
        if dtype == torch.float16 and not (torch.isfinite(new_keys).all() and torch.isfinite(new_values).all()):
            raise ValueError("keys or values beyond the fp16 range cannot be cached in fp16")
        layer.recent_keys = torch.cat([layer.recent_keys, new_keys], dim=2)
        layer.recent_values = torch.cat([layer.recent_values, new_values], dim=2)
        return layer

    def attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Append layer `index`'s new keys/values and return the attention of q [B, heads, new, head_dim] over
        everything the layer holds: [B, heads, new, head_dim]."""
        layer = self.append(index, keys, values)
        query = q.float()  # attention runs in fp32 whatever the model's dtype; the output goes back to it
        if layer.keys is None:
            out = attend_fp32(query, layer.recent_keys.float(), layer.recent_values.float())
        elif self.read == "dequantize":
            out = attend_fp32(query, *self.keys_values(index))
        elif q.shape[2] == 1:
            out = attend_quantized(query, layer.keys, layer.values, layer.recent_keys, layer.recent_values)
        else:
            keys, values = layer.dequantized()
            out = attend_fp32(query, torch.cat([keys, layer.recent_keys.float()], 2),
                              torch.cat([values, layer.recent_values.float()], 2))
        return out.to(q.dtype)

    def keys_values(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (keys, values) [B, heads, tokens, head_dim]: the quantized part dequantized into the
        shared scratch buffer (valid until the next layer is read), then the window; fp32."""
        layer = self.layers[index]
        if layer.keys is None:
            return layer.recent_keys.float(), layer.recent_values.float()
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
            self._scratch = tuple(like.new_empty(batch, heads, capacity, head_dim, dtype=torch.float32) for _ in range(2))
        return self._scratch

    def flush(self) -> None:
        """Quantize, in every layer, the oldest tokens beyond the `residual` newest: per-channel keys in whole
        key groups, per-token keys all of them."""
        if self.residual is None:
            return
        unit = self.group_size if self.key_grouping == "channel" else 1
        for layer in self.layers:
            moving = (layer.recent_keys.shape[2] - self.residual) // unit * unit
            if moving > 0:
                self._quantize_oldest(layer, moving)

    def _quantize_oldest(self, layer: LayerCache, moving: int) -> None:
        old_keys, old_values = layer.recent_keys[:, :, :moving].float(), layer.recent_values[:, :, :moving].float()
        # Slices of the residual would keep its whole buffer alive; own copies let it be freed.
        layer.recent_keys = layer.recent_keys[:, :, moving:].clone()
        layer.recent_values = layer.recent_values[:, :, moving:].clone()
        channels, zero_point = self.value_group(old_values.shape[-1]), self.bits == 8
        # per token: [B, H, T, D] -> [B, H, T, channel groups, group channels], grouped over the channels
        if self.key_grouping == "channel":  # keys [B, H, T, D] -> [B, H, groups, group tokens, D], over the tokens
            keys = quantize(old_keys.unflatten(2, (-1, self.group_size)), self.bits, dim=-2)
            values = quantize(old_values.unflatten(-1, (-1, channels)), self.bits, dim=-1, zero_point=zero_point)
        else:  # both per token, in one call: decoding quantizes every step, and each call is ~30 small ops
            both = torch.stack([old_keys, old_values]).unflatten(-1, (-1, channels))
            keys, values = quantize(both, self.bits, dim=-1, zero_point=zero_point).unstack()
        layer.keys = keys if layer.keys is None else layer.keys.cat(keys, dim=2)
        layer.values = values if layer.values is None else layer.values.cat(values, dim=2)

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: `value_group_size`, or the whole head when it is 0 or does not divide it."""
        size = self.value_group_size
        return size if size and head_dim % size == 0 else head_dim

    def full_precision_nbytes(self, element_size: int = 4) -> int:
        """What the same tokens take in an unquantized cache of `element_size`-byte elements."""
        # batch x heads x head_dim elements per token, from the window's shape (it may hold no token)
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
            out.append((torch.cat([quantized[0], layer.recent_keys.float()], 2),
                        torch.cat([quantized[1], layer.recent_values.float()], 2)))
        return out
