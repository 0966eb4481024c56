"""The `kvcache:` section of a run config."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ryzen_core import PluginSettings


class KVCacheSettings(PluginSettings):
    """How the KV cache is quantized and read (README, Settings)."""

    enabled: bool = True
    """False leaves generation to the plain fp32 KV-cache loop (the plugin only records that)."""
    bits: Literal[8, 4] = 8
    """Bits per stored key/value element; 4-bit codes are packed two to a byte."""
    key_grouping: Literal["auto", "channel", "token"] = "auto"
    """Keys quantized per channel in groups of `group_size` tokens (KIVI; needs a window of up to
    group_size - 1 unquantized tokens while a group fills) or per token (no such window); auto: per token
    for int8 (accurate at 8 bits, and what brings the whole cache to 1.9x fewer bytes than bf16), per
    channel for 4-bit (per-token 4-bit keys lose much more)."""
    group_size: int = Field(0, ge=0, le=4096)
    """Keys per channel: tokens per quantization group (one fp16 scale and minimum per channel per group). Even;
    0: `key_group_for(context)`, 128 where the model's context holds 1,024 tokens or more, else an
    eighth of it, so a short-context model's cache is quantized too."""
    value_group_size: int = Field(0, ge=0, le=4096)
    """Values, and keys per token: channels per group (one fp16 scale and an offset per token per group); 0,
    or a size that does not divide the head dimension: the whole head. Even."""
    residual: int = Field(0, ge=0, le=65536)
    """Newest tokens kept unquantized (fp16) beyond the key group still filling: between `residual` and
    `residual + group_size - 1` tokens with keys per channel, exactly `residual` with keys per token."""
    read: Literal["direct", "dequantize"] = "direct"
    """Built-in Transformer: attend against the codes ("direct") or dequantize each layer into a reused
    scratch buffer first. HF models always take the scratch."""

    def key_grouping_for(self) -> str:
        """"channel" or "token" (auto: token for int8, channel for 4-bit)."""
        if self.key_grouping != "auto":
            return self.key_grouping
        return "token" if self.bits == 8 else "channel"

    def key_group_for(self, context: int) -> int:
        """The key group size for a model of `context` positions (group_size 0: chosen from it)."""
        if self.group_size:
            return self.group_size
        return max(2, min(128, context // 8) // 2 * 2)

    @field_validator("group_size", "value_group_size")
    @classmethod
    def _even(cls, size: int) -> int:
        if size % 2:
            raise ValueError(f"must be even (4-bit codes pack two per byte along a group), got {size}")
        return size
