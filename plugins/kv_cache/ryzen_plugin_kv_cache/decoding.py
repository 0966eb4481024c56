"""Generation and teacher-forced scoring through a `QuantizedKVCache`, for the built-in Transformer and
HF Llama-architecture models. The built-in Transformer's forward is run layer by layer here so that each
layer attends against the quantized cache directly (or against a reused dequantization scratch); an HF model
gets a transformers `Cache` whose layers hand its attention the keys/values dequantized into the scratch.
New tokens' keys/values are appended, and whole groups beyond the residual quantized after each forward."""
from __future__ import annotations

from functools import cache as once
from typing import Callable

import torch

from ryzen_core import Transformer, context_length, decode_loop, is_hf_model, model_outputs

from .cache import QuantizedKVCache


def builtin_forward(model, cache: QuantizedKVCache, input_ids: torch.Tensor) -> torch.Tensor:
    """The built-in Transformer's forward (eval mode), with each layer's attention computed by `cache`
    over what it holds — never a list of every layer's fp32 keys and values, as the model's own cache is."""
    past, new = len(cache), input_ids.shape[1]
    if past + new > model.config.context_length:
        raise ValueError(f"sequence length {past + new} exceeds context_length {model.config.context_length}")
    x = model.tok_emb(input_ids) + model.pos_emb(torch.arange(past, past + new, device=input_ids.device))
    for index, block in enumerate(model.blocks):
        attention = block.attn
        q, k, v = attention.qkv(block.norm_attn(x)).split(x.shape[-1], dim=2)
        q, k, v = (t.view(x.shape[0], new, attention.n_heads, attention.head_dim).transpose(1, 2) for t in (q, k, v))
        y = cache.attend(index, q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + attention.proj(y)
        x = x + block.mlp(block.norm_mlp(x))
    return model.lm_head(model.norm_final(x))


@once
def _hf_layer_class():
    """A transformers cache layer backed by one `QuantizedKVCache` layer (transformers is imported only here)."""
    from transformers.cache_utils import DynamicLayer

    class QuantizedHFLayer(DynamicLayer):
        """`update` appends the new keys/values and returns the layer's keys/values, the quantized part
        dequantized into the cache's shared scratch."""

        def __init__(self, cache: QuantizedKVCache, index: int):
            super().__init__()
            self.cache, self.index, self.is_initialized = cache, index, True

        def update(self, key_states, value_states, *args, **kwargs):
            self.cache.append(self.index, key_states, value_states)
            keys, values = self.cache.keys_values(self.index)  # fp32; a bf16 model's attention wants bf16
            return keys.to(key_states.dtype), values.to(value_states.dtype)

        def get_seq_length(self) -> int:
            return len(self.cache.layers[self.index]) if self.index < len(self.cache.layers) else 0

    return QuantizedHFLayer


def hf_forward(model, cache: QuantizedKVCache, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import Cache

    layers = [_hf_layer_class()(cache, index) for index in range(model.config.num_hidden_layers)]
    logits, _ = model_outputs(model, input_ids, Cache(layers=layers))
    return logits


def cached_forward(model, cache: QuantizedKVCache, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] for `input_ids` following what `cache` holds; their keys/values join the cache, and
    whole groups beyond the residual are quantized once the forward is done."""
    if is_hf_model(model):
        logits = hf_forward(model, cache, input_ids)
    elif isinstance(model, Transformer):
        logits = builtin_forward(model, cache, input_ids)
    else:
        raise TypeError(f"the quantized KV cache runs the built-in Transformer or an HF model, not {type(model).__name__}")
    cache.flush()
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


def incremental_quality(model, input_ids: torch.Tensor, bits: int, **cache_settings) -> dict:
    """Teacher-forced perplexity token by token through the quantized cache (`QuantizedKVCache(bits,
    **cache_settings)`) and the fp32 one, top-1 agreement and mean KL(fp32 || quantized) over the predicted
    positions (`compare_logits`), and KV bytes per token of each cache at the end."""
    reference_cache, quantized_cache = QuantizedKVCache(residual=None), QuantizedKVCache(bits, **cache_settings)
    reference = incremental_logits(model, input_ids, reference_cache)
    quantized = incremental_logits(model, input_ids, quantized_cache)
    tokens = input_ids.shape[0] * input_ids.shape[1]
    return {**compare_logits(reference, quantized, input_ids),
            "kv_bytes_per_token_fp32": reference_cache.nbytes / tokens,
            "kv_bytes_per_token_quantized": quantized_cache.nbytes / tokens}


def compare_logits(reference: torch.Tensor, quantized: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """Perplexity of `input_ids` under each of two logits [B, T, V] (position t predicts t + 1), top-1
    agreement and mean KL(reference || quantized) over the predicted positions."""
    reference, quantized = reference.double()[:, :-1], quantized.double()[:, :-1]
    targets = input_ids[:, 1:]

    def perplexity(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).exp().item()

    log_p, log_q = reference.log_softmax(-1), quantized.log_softmax(-1)
    return {
        "tokens": int(targets.numel()),
        "perplexity_fp32_cache": perplexity(reference),
        "perplexity_quantized_cache": perplexity(quantized),
        "top1_agreement": (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item(),
        "kl_fp32_to_quantized": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
    }
