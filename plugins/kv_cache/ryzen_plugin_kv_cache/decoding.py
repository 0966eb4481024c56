"""Generation and teacher-forced scoring through a `QuantizedKVCache`, for the built-in Transformer and
HF causal LMs: every forward attends against the cache as read (dequantized), and the keys and values it
computes for its new tokens are appended (and quantized once they age out of the residual)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ryzen_core import context_length, decode_loop, is_hf_model, model_outputs

from .cache import QuantizedKVCache


def _model_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
    if layers is None or not is_hf_model(model):
        return layers  # the built-in Transformer takes a list of (k, v) per layer
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _layer_tensors(model_cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(model_cache, (list, tuple)):
        return list(model_cache)
    return [(layer.keys, layer.values) for layer in model_cache.layers]


def cached_forward(model, cache: QuantizedKVCache, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] for `input_ids` following what `cache` holds; their keys/values join the cache."""
    past = len(cache)
    logits, model_cache = model_outputs(model, input_ids, _model_cache(model, cache.read()))
    cache.append([(k[:, :, past:], v[:, :, past:]) for k, v in _layer_tensors(model_cache)])
    return logits


def quantized_generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache: QuantizedKVCache, *,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       eos_token_id: int | None = None, generator: torch.Generator | None = None,
                       on_token: Callable[[int], None] | None = None) -> torch.Tensor:
    """`ryzen_core.generate`'s contract (prefill, one token per step, eos padding, `on_token(step)`),
    with `cache` (empty) as the KV cache."""
    # decode_loop checks the input's shape and the built-in model's context; a Llama's is checked here.
    total = input_ids.shape[1] + max_new_tokens if input_ids.dim() == 2 else 0
    if total > context_length(model):
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds the model's context_length {context_length(model)}")

    def next_logits(sequence: torch.Tensor, new_token: torch.Tensor | None) -> torch.Tensor:
        step_input = sequence if new_token is None else new_token.unsqueeze(1).to(sequence.dtype)
        return cached_forward(model, cache, step_input)[:, -1, :]

    return decode_loop(model, input_ids, max_new_tokens, next_logits, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_token_id=eos_token_id, generator=generator, on_token=on_token)


def incremental_logits(model, input_ids: torch.Tensor, cache: QuantizedKVCache) -> torch.Tensor:
    """Logits [B, T, V] computed one token at a time through `cache` (empty), so every position but the
    first reads the cache — what a single-pass perplexity never does."""
    with torch.inference_mode():
        return torch.cat([cached_forward(model, cache, input_ids[:, i:i + 1]) for i in range(input_ids.shape[1])],
                         dim=1)


def incremental_quality(model, input_ids: torch.Tensor, bits: int, group_size: int, residual: int) -> dict:
    """Teacher-forced perplexity token by token through the quantized and the fp32 cache, top-1 agreement
    and mean KL(fp32 || quantized) over the predicted positions, and KV bytes per token of each cache."""
    reference_cache, quantized_cache = QuantizedKVCache(residual=None), QuantizedKVCache(bits, group_size, residual)
    reference = incremental_logits(model, input_ids, reference_cache).double()[:, :-1]
    quantized = incremental_logits(model, input_ids, quantized_cache).double()[:, :-1]
    targets = input_ids[:, 1:]

    def perplexity(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).exp().item()

    log_p, log_q = reference.log_softmax(-1), quantized.log_softmax(-1)
    tokens = input_ids.shape[0] * input_ids.shape[1]
    return {
        "tokens": int(targets.numel()),
        "perplexity_fp32_cache": perplexity(reference),
        "perplexity_quantized_cache": perplexity(quantized),
        "top1_agreement": (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item(),
        "kl_fp32_to_quantized": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "kv_bytes_per_token_fp32": reference_cache.nbytes / tokens,
        "kv_bytes_per_token_quantized": quantized_cache.nbytes / tokens,
    }
