"""The kvcache plugin (entry-point name `kvcache`): one `KVCachePlugin` per variant.

- on_infer: replaces the variant's generation with the same loop over a quantized KV cache (int8 or
  4-bit, KIVI-style grouping, fp16 scales, the newest tokens in fp16) on the same model; records the settings
  once and, after every generation, the KV bytes per token of the quantized cache against fp32 and bf16
  (measured from the stored tensors) and the size of the dequantization scratch, if one was used.

It changes no weights and no training, so `ryzen run --plugins kvcache` shares the baseline's weights and
validation compares the two caches on one model: agreement with the baseline is the quality check.
"""
from __future__ import annotations

from typing import Any

from ryzen_core import InferencePath, Plugin, context_length, hookimpl

from .settings import KVCacheSettings


class KVCachePlugin(Plugin):
    """Generation through a quantized KV cache."""

    Settings = KVCacheSettings

    def __init__(self, settings: KVCacheSettings | None = None, context: Any = None):
        super().__init__(settings, context)
        self.generations = 0

    @hookimpl
    def on_infer(self, generate, model, record):
        settings = self.settings
        if not settings.enabled:
            record("kv_cache_off", reason="kvcache.enabled is false")
            return None
        if isinstance(generate, InferencePath) and generate.logits is not None:
            # An earlier plugin generates with another model; caching `model`'s keys would measure a
            # different model than the one that runs.
            record("kv_cache_off", reason="an earlier plugin's on_infer generates with another model")
            return None
        record("kv_cache", replaces="the plain fp32 KV-cache loop (same model)",
               **{**settings.model_dump(), "group_size": settings.key_group_for(context_length(model)),
                  "key_grouping": settings.key_grouping_for()})
        return self.quantized_generate(model, record)

    def quantized_generate(self, model, record=None):
        """`generate(input_ids, max_new_tokens, *, temperature, top_k, top_p, eos_token_id, generator,
        on_token)` through a fresh quantized cache per call."""
        from .cache import QuantizedKVCache
        from .decoding import quantized_generate

        settings = self.settings
        key_group = settings.key_group_for(context_length(model))

        def generate(input_ids, max_new_tokens, **sampling):
            cache = QuantizedKVCache(settings.bits, key_group, settings.residual, settings.value_group_size,
                                     settings.read, settings.key_grouping_for())
            sequence = quantized_generate(model, input_ids, max_new_tokens, cache, **sampling)
            self.generations += 1
            if record is not None and len(cache):
                rows_tokens = len(cache) * int(input_ids.shape[0])
                record("generation", batch=int(input_ids.shape[0]), cached_tokens=len(cache),
                       kv_bytes_per_token=cache.nbytes / rows_tokens,
                       kv_bytes_per_token_fp32=cache.full_precision_nbytes(4) / rows_tokens,
                       kv_bytes_per_token_bf16=cache.full_precision_nbytes(2) / rows_tokens,
                       window_tokens=cache.window_tokens, window_dtype=str(cache.window_dtype).removeprefix("torch."),
                       scratch_bytes=cache.scratch_nbytes)
            return sequence

        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        generate.precision = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
            str(dtypes.pop())) if len(dtypes) == 1 else None
        return generate
