"""Decoding through the quantized cache on briefly trained tiny models (built-in and HF Llama): the fp32
cache reproduces plain decoding, the quantized part is really read, and token-by-token perplexity and
top-1 agreement stay close to the fp32 cache's."""
from __future__ import annotations

import copy

import pytest
import torch

from ryzen_core import generate, is_hf_model, lm_logits
from ryzen_plugin_kv_cache import QuantizedKVCache, incremental_logits, incremental_quality, quantized_generate
from ryzen_plugin_kv_cache.decoding import cached_forward


def test_the_full_precision_cache_is_plain_decoding(model, text_ids):
    prompt = text_ids[:, :100]
    assert torch.equal(quantized_generate(model, prompt, 24, QuantizedKVCache(residual=None)), generate(model, prompt, 24))
    with torch.inference_mode():
        single_pass = lm_logits(model, text_ids[:, :40])
    stepped = incremental_logits(model, text_ids[:, :40], QuantizedKVCache(residual=None))
    assert torch.allclose(stepped, single_pass, atol=1e-4)


@pytest.mark.parametrize("bits, key_grouping", [(8, "token"), (8, "channel"), (4, "channel")])
@pytest.mark.parametrize("read", ["direct", "dequantize"])
def test_the_quantized_part_is_read(model, text_ids, bits, key_grouping, read):
    """Corrupting the stored codes must change the next logits, whichever way the cache is read: a cache
    that kept an fp32 copy on the side, or never read its quantized part, fails here."""
    cache = QuantizedKVCache(bits, group_size=16, residual=16, value_group_size=8, read=read,
                             key_grouping=key_grouping)
    with torch.inference_mode():
        cached_forward(model, cache, text_ids[:, :150])
        # per channel: 128 quantized (8 key groups), 22 in the window; per token: 134 and the residual's 16
        assert cache.layers[0].quantized_tokens == (128 if key_grouping == "channel" else 134)
        next_token = text_ids[:, 150:151]
        clean = cached_forward(model, cache, next_token)
        for layer in cache.layers:  # drop the token just added, then corrupt what is stored quantized
            layer.recent_keys, layer.recent_values = layer.recent_keys[:, :, :-1], layer.recent_values[:, :, :-1]
            layer.keys.codes.fill_(0)
            layer.values.codes.fill_(0)
        corrupted = cached_forward(model, cache, next_token)
    assert (clean - corrupted).abs().max() > 0.1
    # Attending against the codes keeps no dequantized copy at all; HF models always take the scratch.
    assert (cache.scratch_nbytes == 0) == (read == "direct" and not is_hf_model(model))


@pytest.mark.parametrize("bits, key_grouping, max_perplexity_rise, min_agreement",
                         [(8, "token", 0.005, 0.98), (8, "channel", 0.005, 0.98), (4, "channel", 0.05, 0.90)])
def test_token_by_token_perplexity_and_agreement(model, text_ids, bits, key_grouping, max_perplexity_rise,
                                                 min_agreement):
    quality = incremental_quality(model, text_ids, bits, group_size=16, residual=16, value_group_size=8,
                                  key_grouping=key_grouping)
    reference, quantized = quality["perplexity_fp32_cache"], quality["perplexity_quantized_cache"]
    assert reference < 30  # trained: far below the vocabulary size, so agreement is not between near-ties
    assert abs(quantized / reference - 1) <= max_perplexity_rise
    assert quality["top1_agreement"] >= min_agreement
    assert -1e-9 < quality["kl_fp32_to_quantized"] < (0.01 if bits == 8 else 0.1)  # KL >= 0 up to rounding
    assert quality["kv_bytes_per_token_quantized"] < quality["kv_bytes_per_token_fp32"]


def test_a_bf16_model_decodes_through_the_cache(model, text_ids):
    """A bf16 model's keys and values are windowed in fp16 and quantized from fp32; attention runs in fp32
    and the model's attention gets its own dtype back."""
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    prompt = text_ids[:, :150]
    cache = QuantizedKVCache(8, group_size=16, residual=16, key_grouping="channel")
    out = quantized_generate(bf16_model, prompt, 8, cache)
    assert out.shape == (2, 158) and cache.layers[0].quantized_tokens == 128
    assert cache.layers[0].recent_keys.dtype == torch.float16


def test_sampling_with_eos_follows_the_generate_contract(model, text_ids):
    prompt, steps = text_ids[:, :60], []
    sampled = quantized_generate(model, prompt, 30, QuantizedKVCache(8, 16, 16), temperature=0.8, top_k=20,
                                 generator=torch.Generator().manual_seed(0), on_token=steps.append)
    assert sampled.shape == (2, 90) and steps == list(range(30))
    eos = int(sampled[0, 60])  # the first sampled token of row 0 ends it
    ended = quantized_generate(model, prompt, 30, QuantizedKVCache(8, 16, 16), temperature=0.8, top_k=20,
                               eos_token_id=eos, generator=torch.Generator().manual_seed(0))
    assert bool((ended[0, 60:] == eos).all())
    with pytest.raises(ValueError, match="context_length"):
        quantized_generate(model, prompt, 1000, QuantizedKVCache())
