"""Asymmetric group quantization along a tensor's last dimension (KIVI, arXiv 2402.02750, section 3), with
fp16 metadata.

Each group of `group` consecutive elements of the last dimension gets a minimum and a scale, both stored in
fp16 and rounded outward — the minimum down, the scale up so that minimum + (2**bits - 1) * scale still
reaches the group's maximum — so a code round((x - minimum) / scale) in 0 .. 2**bits - 1 reconstructs
minimum + code * scale within scale / 2 of x, where minimum and scale are the stored fp16 values.
4-bit codes are packed two per byte: element 2j in the low nibble, 2j + 1 in the high one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METADATA_DTYPE = torch.float16
_SMALLEST_SCALE = torch.finfo(METADATA_DTYPE).tiny  # a constant group still gets a positive scale


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [..., N] (8-bit) or [..., N / 2] (4-bit, two codes per byte)
    scale: torch.Tensor  # fp16 [..., N / group]
    minimum: torch.Tensor  # fp16 [..., N / group]
    bits: int

    @property
    def group(self) -> int:
        return self.codes.shape[-1] * (8 // self.bits) // self.scale.shape[-1]

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 codes [..., N], one per element."""
        return unpack(self.codes) if self.bits == 4 else self.codes

    def dequantize(self) -> torch.Tensor:
        """fp32 [..., N]."""
        grouped = self.unpacked_codes().unflatten(-1, (-1, self.group)).float()
        return torch.addcmul(self.minimum.float().unsqueeze(-1), grouped, self.scale.float().unsqueeze(-1)).flatten(-2)

    def cat(self, other: "QuantizedTensor", dim: int) -> "QuantizedTensor":
        """Both joined along `dim`, which must not be the last dimension unless whole groups are joined."""
        return QuantizedTensor(torch.cat([self.codes, other.codes], dim), torch.cat([self.scale, other.scale], dim),
                               torch.cat([self.minimum, other.minimum], dim), self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


def quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """`x` (fp32) [..., N] in groups of `group` along N (N a multiple of `group`; `group` even for 4-bit)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.shape[-1] % group or (bits == 4 and group % 2):
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the group size {group} "
                         f"(which must be even for 4-bit)")
    grouped = x.float().unflatten(-1, (-1, group))
    levels = 2 ** bits - 1
    minimum = _round_toward(grouped.amin(dim=-1), float("-inf"))
    needed = (grouped.amax(dim=-1) - minimum.float()) / levels
    scale = _round_toward(needed, float("inf")).clamp_min(_SMALLEST_SCALE)
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise ValueError("values beyond the fp16 range cannot be quantized with fp16 scales")
    codes = ((grouped - minimum.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).round_().clamp_(0, levels)
    codes = codes.flatten(-2).to(torch.uint8)
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
