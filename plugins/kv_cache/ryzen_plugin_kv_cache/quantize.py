"""Asymmetric quantization with fp16 scales (KIVI, arXiv 2402.02750, section 3), one group per slice along a
chosen dimension: the caller shapes the tensor so that a group is that dimension's full extent (keys per
channel: [..., groups, group tokens, head_dim] over the tokens; per token: [..., tokens, groups, group
channels] over the channels, as values always are).

Each group gets a scale and the value its code 0 stands for, in one of two forms:
- an fp16 minimum: the minimum rounded down, the scale up so that minimum + (2**bits - 1) * scale still
  reaches the group's maximum;
- a uint8 zero point z (`zero_point=True`; 1 byte instead of 2, which is what brings int8 per-token groups
  to 3 bytes of metadata): code 0 stands for -z * scale, the scale is rounded up from range / (2**bits - 2)
  so that some whole z covers the group's range widened to include 0 (per-token groups of keys or values
  straddle 0; a per-channel key group may not, so those keep the fp16 minimum).
Either way a code round((x - offset) / scale) in 0 .. 2**bits - 1 reconstructs offset + code * scale within
scale / 2 of x, with the scale as stored. 4-bit codes are packed two per byte along the last dimension:
element 2j in the low nibble, 2j + 1 in the high one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METADATA_DTYPE = torch.float16
_SMALLEST_SCALE = torch.finfo(METADATA_DTYPE).tiny  # a constant group still gets a positive scale


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8, the input's shape; 4-bit: the last dimension halved (two codes per byte)
    scale: torch.Tensor  # fp16, the input's shape with the grouped dimension reduced to 1
    minimum: torch.Tensor | None  # fp16, as scale; None when zero_point holds the offset
    bits: int
    dim: int  # the grouped dimension, counted from the end (-1: along the last one)
    zero_point: torch.Tensor | None = None  # uint8, as scale: code 0 stands for -zero_point * scale

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 codes, one per element."""
        return unpack(self.codes) if self.bits == 4 else self.codes

    def offset(self) -> torch.Tensor:
        """The value code 0 stands for, fp32, shaped as scale."""
        if self.minimum is not None:
            return self.minimum.float()
        return -self.zero_point.float() * self.scale.float()  # exact: an 8-bit integer times an fp16 value

    def dequantize(self) -> torch.Tensor:
        """fp32, the input's shape."""
        return torch.addcmul(self.offset(), self.unpacked_codes().float(), self.scale.float())

    def unstack(self) -> list["QuantizedTensor"]:
        """The tensors stacked along dim 0 (quantized together), each with storage of its own."""
        parts = [part.unbind(0) if part is not None else [None] * len(self.codes) for part in
                 (self.codes, self.scale, self.minimum, self.zero_point)]
        return [QuantizedTensor(*(None if t is None else t.clone() for t in (codes, scale, minimum)), self.bits,
                                self.dim, None if zero is None else zero.clone())
                for codes, scale, minimum, zero in zip(*parts)]

    def stored(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.minimum, self.zero_point) if t is not None]

    def cat(self, other: "QuantizedTensor", dim: int) -> "QuantizedTensor":
        """Both joined along `dim` (not the grouped dimension)."""
        def joined(a, b):
            return None if a is None else torch.cat([a, b], dim)

        return QuantizedTensor(joined(self.codes, other.codes), joined(self.scale, other.scale),
                               joined(self.minimum, other.minimum), self.bits, self.dim,
                               joined(self.zero_point, other.zero_point))

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes, scales and minima or zero points."""
        return sum(t.numel() * t.element_size() for t in self.stored())


def quantize(x: torch.Tensor, bits: int, dim: int = -1, zero_point: bool = False) -> QuantizedTensor:
    """`x` (fp32) with one group per slice along `dim` (the last dimension must be even for 4-bit); the
    offset as an fp16 minimum, or as a uint8 zero point (`zero_point`)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"4-bit codes pack two per byte along the last dimension, which is {x.shape[-1]} (odd)")
    x = x.float()
    levels = 2 ** bits - 1
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    if zero_point:
        low, high = low.clamp_max(0), high.clamp_min(0)
        # One level of slack: z = ceil(-low / scale) then leaves (levels - z) * scale >= high.
        scale = _round_toward((high - low) / (levels - 1), float("inf")).clamp_min(_SMALLEST_SCALE)
        zero = (-low / scale.float()).ceil_().clamp_(0, levels)
        minimum, offset = None, -zero * scale.float()
    else:
        minimum = _round_toward(low, float("-inf"))
        scale = _round_toward((high - minimum.float()) / levels, float("inf")).clamp_min(_SMALLEST_SCALE)
        zero, offset = None, minimum.float()
    if not (torch.isfinite(offset).all() and torch.isfinite(scale).all()):
        raise ValueError("values beyond the fp16 range cannot be quantized with fp16 scales")
    codes = ((x - offset) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(pack(codes) if bits == 4 else codes, scale, minimum, bits, dim - x.dim() if dim >= 0 else dim,
                           None if zero is None else zero.to(torch.uint8))


def _round_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """`x` (fp32) in fp16, rounded toward `direction` (-inf: never above x; +inf: never below)."""
    rounded = x.to(METADATA_DTYPE)
    wrong_side = rounded.float() > x if direction < 0 else rounded.float() < x
    return torch.where(wrong_side, torch.nextafter(rounded, torch.tensor(direction, dtype=METADATA_DTYPE)), rounded)


def pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
