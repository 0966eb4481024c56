"""The `kvcache:` section of a run config."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ryzen_core import PluginSettings


class KVCacheSettings(PluginSettings):
    """How the KV cache is quantized (README, Settings)."""

    enabled: bool = True
    """False leaves generation to the plain fp32 KV-cache loop (the plugin only records that)."""
    bits: Literal[8, 4] = 8
    """Bits per stored key/value element; 4-bit codes are packed two to a byte."""
    group_size: int = Field(32, ge=2, le=1024)
    """Keys: tokens per quantization group (one scale per channel per group). Values: channels per group
    (one scale per token per group), capped at the head dimension. Must be even (4-bit packing)."""
    residual: int = Field(32, ge=0, le=65536)
    """The most recent tokens kept in fp32; older ones are quantized a group at a time, so between
    `residual` and `residual + group_size - 1` tokens are in fp32 at any moment."""
