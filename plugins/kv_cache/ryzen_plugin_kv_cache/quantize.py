"""Asymmetric quantization with fp16 metadata (KIVI, arXiv 2402.02750, section 3), one group per slice
along a chosen dimension: the caller shapes the tensor so that a group is that dimension's full extent
(keys: [..., groups, group tokens, head_dim] over the tokens; values: [..., tokens, groups, group channels]
over the channels).

Each group gets a minimum and a scale, both stored in fp16 and rounded outward — the minimum down, the scale
up so that minimum + (2**bits - 1) * scale still reaches the group's maximum — so a code
round((x - minimum) / scale) in 0 .. 2**bits - 1 reconstructs minimum + code * scale within scale / 2 of x,
where minimum and scale are the stored fp16 values. 4-bit codes are packed two per byte along the last
dimension: element 2j in the low nibble, 2j + 1 in the high one.
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
    minimum: torch.Tensor  # fp16, as scale
    bits: int

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 codes, one per element."""
        return unpack(self.codes) if self.bits == 4 else self.codes

    def dequantize(self) -> torch.Tensor:
        """fp32, the input's shape."""
        return torch.addcmul(self.minimum.float(), self.unpacked_codes().float(), self.scale.float())

    def cat(self, other: "QuantizedTensor", dim: int) -> "QuantizedTensor":
        """Both joined along `dim` (not the grouped dimension)."""
        return QuantizedTensor(torch.cat([self.codes, other.codes], dim), torch.cat([self.scale, other.scale], dim),
                               torch.cat([self.minimum, other.minimum], dim), self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


def quantize(x: torch.Tensor, bits: int, dim: int = -1) -> QuantizedTensor:
    """`x` (fp32) with one group per slice along `dim` (the last dimension must be even for 4-bit)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"4-bit codes pack two per byte along the last dimension, which is {x.shape[-1]} (odd)")
    x = x.float()
    levels = 2 ** bits - 1
    minimum = _round_toward(x.amin(dim=dim, keepdim=True), float("-inf"))
    needed = (x.amax(dim=dim, keepdim=True) - minimum.float()) / levels
    scale = _round_toward(needed, float("inf")).clamp_min(_SMALLEST_SCALE)
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise ValueError("values beyond the fp16 range cannot be quantized with fp16 scales")
    codes = ((x - minimum.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(pack(codes) if bits == 4 else codes, scale, minimum, bits)


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
