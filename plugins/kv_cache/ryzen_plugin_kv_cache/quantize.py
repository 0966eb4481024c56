"""Asymmetric group quantization along a tensor's last dimension (KIVI, arXiv 2402.02750, section 3).

Each group of `group` consecutive elements of the last dimension gets its own minimum and scale,
scale = (max - min) / (2**bits - 1); a code is round((x - min) / scale) in 0 .. 2**bits - 1, so the
reconstruction min + code * scale is within scale / 2 of x. 4-bit codes are packed two per byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [..., N] (8-bit) or [..., N / 2] (4-bit, two codes per byte)
    scale: torch.Tensor  # [..., N / group], the input's dtype
    minimum: torch.Tensor  # [..., N / group]
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        codes = _unpack(self.codes) if self.bits == 4 else self.codes
        grouped = codes.unflatten(-1, (-1, self.group)).to(self.scale.dtype)
        return (grouped * self.scale.unsqueeze(-1) + self.minimum.unsqueeze(-1)).flatten(-2)

    def cat(self, other: "QuantizedTensor", dim: int) -> "QuantizedTensor":
        """Both joined along `dim`, which must not be the last dimension unless whole groups are joined."""
        return QuantizedTensor(torch.cat([self.codes, other.codes], dim), torch.cat([self.scale, other.scale], dim),
                               torch.cat([self.minimum, other.minimum], dim), self.bits, self.group)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


def quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """`x` [..., N] in groups of `group` along N (N a multiple of `group`; even for 4-bit)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.shape[-1] % group:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the group size {group}")
    grouped = x.unflatten(-1, (-1, group))
    minimum = grouped.amin(dim=-1)
    # A constant group has scale 0; any positive scale then reconstructs it exactly (code 0).
    scale = ((grouped.amax(dim=-1) - minimum) / (2 ** bits - 1)).clamp_min(torch.finfo(x.dtype).tiny)
    codes = ((grouped - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)).round_().clamp_(0, 2 ** bits - 1)
    codes = codes.flatten(-2).to(torch.uint8)
    return QuantizedTensor(_pack(codes) if bits == 4 else codes, scale, minimum, bits, group)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
