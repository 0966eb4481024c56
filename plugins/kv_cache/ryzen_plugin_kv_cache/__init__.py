"""A quantized KV cache for Ryzen (KIVI-style: keys per channel, values per token, in groups with fp16
scales and minima, the newest tokens in fp32), attended against directly or through a reused
dequantization scratch."""

from .cache import QuantizedKVCache
from .decoding import cached_forward, compare_logits, incremental_logits, incremental_quality, quantized_generate
from .quantize import QuantizedTensor, quantize
from .settings import KVCacheSettings

__all__ = ["KVCacheSettings", "QuantizedKVCache", "QuantizedTensor", "cached_forward", "compare_logits",
           "incremental_logits", "incremental_quality", "quantize", "quantized_generate"]
