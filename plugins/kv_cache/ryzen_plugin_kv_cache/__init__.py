"""A quantized KV cache for Ryzen (KIVI-style: keys per channel, values per token, in groups, the newest
tokens in fp32), read back dequantized by every decoding step."""

from .cache import QuantizedKVCache
from .decoding import incremental_logits, incremental_quality, quantized_generate
from .quantize import QuantizedTensor, quantize
from .settings import KVCacheSettings

__all__ = ["KVCacheSettings", "QuantizedKVCache", "QuantizedTensor", "incremental_logits", "incremental_quality",
           "quantize", "quantized_generate"]
