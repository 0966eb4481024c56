"""A quantized KV cache for Ryzen (KIVI-style: values per token, keys per token (int8) or per channel
(4-bit), fp16 scales, the newest unquantized tokens in fp16), attended against directly or through a reused
dequantization scratch."""

from .cache import QuantizedKVCache
from .decoding import cached_forward, compare_logits, incremental_logits, incremental_quality, quantized_generate
from .quantize import QuantizedTensor, quantize
from .settings import KVCacheSettings

__all__ = ["KVCacheSettings", "QuantizedKVCache", "QuantizedTensor", "cached_forward", "compare_logits",
           "incremental_logits", "incremental_quality", "quantize", "quantized_generate"]
