"""Group quantization with fp16 metadata: every element within scale/2 of its group (scale and minimum as
stored, rounded outward), 4-bit codes packed two per byte; the cache's layout and bytes (measured from the
stored tensors); attention against the codes equals attention against the dequantized cache."""
from __future__ import annotations

import math

import pytest
import torch

from ryzen_plugin_kv_cache import QuantizedKVCache, quantize
from ryzen_plugin_kv_cache.attention import attend_fp32, attend_quantized


def with_outliers(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) + 0.3
    x[..., 3] *= 20  # one outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_within_half_a_step_of_the_stored_fp16_scale(bits):
    grouped = with_outliers(2, 3, 10, 32).unflatten(-1, (-1, 8))  # groups of 8 along the last dimension
    q = quantize(grouped, bits, dim=-1)
    assert q.scale.dtype == q.minimum.dtype == torch.float16 and q.scale.shape == (2, 3, 10, 4, 1)
    # Rounded outward: the stored range covers the group, so no code is clamped.
    assert bool((q.minimum.float() <= grouped.amin(-1, keepdim=True)).all())
    assert bool((q.minimum.float() + (2 ** bits - 1) * q.scale.float() >= grouped.amax(-1, keepdim=True)).all())
    error = (q.dequantize() - grouped).abs()
    step = q.scale.float()
    assert bool((error <= step / 2 + 1e-6 * grouped.abs().max()).all())
    assert error.max() > 0.4 * step.max() / 2  # a lossy code that uses its bound, not x returned
    assert q.codes.shape[-1] == (8 if bits == 8 else 4)  # 4-bit: two codes per byte
    assert q.codes.dtype == torch.uint8
    across = quantize(grouped, bits, dim=-2)  # groups along another dimension: the same bound
    assert across.scale.shape == (2, 3, 10, 1, 8)
    assert bool(((across.dequantize() - grouped).abs() <= across.scale.float() / 2 + 1e-6 * grouped.abs().max()).all())


def test_outward_rounding_keeps_the_bound_where_rounding_to_nearest_breaks_it():
    """A narrow group just above an fp16 midpoint: the nearest fp16 minimum lies above the data, so the
    lowest element would be clamped to code 0 and miss by far more than half a (tiny) step."""
    x = torch.tensor([[0.10002, 0.10003, 0.10004, 0.10004]])
    nearest_minimum = x.amin().half().float()
    assert nearest_minimum - x.amin() > (x.amax() - x.amin()) / 255 / 2  # what rounding to nearest would do
    q = quantize(x, 8)
    assert q.minimum.float() <= x.amin()
    assert bool(((q.dequantize() - x).abs() <= q.scale.float() / 2 + 1e-9).all())


def test_more_bits_smaller_error_constant_groups_and_fp16_range():
    x = with_outliers(4, 64)
    errors = {bits: (quantize(x, bits).dequantize() - x).abs().max().item() for bits in (8, 4)}
    assert errors[8] < errors[4] / 8
    constant = torch.full((2, 16), 1.5)
    assert torch.equal(quantize(constant, 4).dequantize(), constant)
    with pytest.raises(ValueError, match="fp16 range"):
        quantize(torch.tensor([[-1e6, 0.0]]), 8)  # a minimum fp16 cannot hold
    with pytest.raises(ValueError, match="odd"):
        quantize(torch.zeros(2, 9), 4)


def fill(cache: QuantizedKVCache, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
    """A prompt of `first` tokens, then one token at a time, as decoding does (flush after each forward)."""
    cache.append(0, keys[:, :, :first], values[:, :, :first])
    cache.flush()
    for t in range(first, keys.shape[2]):
        cache.append(0, keys[:, :, t:t + 1], values[:, :, t:t + 1])
        cache.flush()


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_quantizes_whole_groups_beyond_the_residual_and_reads_within_bounds(bits):
    keys, values = with_outliers(1, 2, 75, 16), torch.randn(1, 2, 75, 16)
    cache = QuantizedKVCache(bits, group_size=8, residual=10, value_group_size=8)
    fill(cache, keys, values, 40)
    layer = cache.layers[0]
    assert len(cache) == 75 and cache.fp32_tokens == 11  # 64 quantized (8 key groups), 11 in fp32
    read_keys, read_values = cache.dequantized_layers()[0]
    assert torch.equal(read_keys[:, :, 64:], keys[:, :, 64:])
    # Keys: one scale per channel per group of 8 tokens; values: one per token per 8 channels.
    assert layer.keys.scale.shape == (1, 2, 8, 1, 16) and layer.values.scale.shape == (1, 2, 64, 2, 1)
    key_step = layer.keys.scale.float().squeeze(3).repeat_interleave(8, dim=2)  # [1, 2, 64 tokens, 16]
    value_step = layer.values.scale.float().squeeze(-1).repeat_interleave(8, dim=-1)
    assert bool(((read_keys[:, :, :64] - keys[:, :, :64]).abs() <= key_step / 2 + 1e-5).all())
    assert bool(((read_values[:, :, :64] - values[:, :, :64]).abs() <= value_step / 2 + 1e-5).all())
    # The scratch read is the same dequantization, written in place.
    scratch_keys, scratch_values = cache.keys_values(0)
    assert torch.allclose(scratch_keys, read_keys, atol=1e-6) and torch.allclose(scratch_values, read_values, atol=1e-6)


def stored_bytes(cache: QuantizedKVCache) -> int:
    """Every tensor the cache's layers hold, counted independently of `nbytes`."""
    total = 0
    for layer in cache.layers:
        for part in (layer.keys, layer.values):
            total += sum(t.untyped_storage().nbytes() for t in (part.codes, part.scale, part.minimum))
        total += layer.recent_keys.untyped_storage().nbytes() + layer.recent_values.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("bits, bytes_per_token_head, min_ratio_to_bf16", [(8, 134, 1.9), (4, 70, 3.5)])
def test_bytes_per_token_from_the_stored_tensors(bits, bytes_per_token_head, min_ratio_to_bf16):
    """Head dim 64, key groups of 128 tokens, one value group per head, fp16 scales and minima: int8 is
    64 + 64 code bytes + 2 (keys) + 4 (values) metadata bytes per token per head, 4-bit 32 + 32 + 2 + 4."""
    batch, heads, tokens = 2, 3, 256
    keys, values = with_outliers(batch, heads, tokens + 5, 64), torch.randn(batch, heads, tokens + 5, 64)
    cache = QuantizedKVCache(bits, group_size=128, residual=0)
    fill(cache, keys, values, 100)
    assert cache.fp32_tokens == 5 and cache.nbytes == stored_bytes(cache)
    quantized_bytes = cache.nbytes - 2 * batch * heads * 5 * 64 * 4
    assert quantized_bytes == batch * heads * tokens * bytes_per_token_head
    bf16_bytes = batch * heads * tokens * 2 * 64 * 2
    assert bf16_bytes / quantized_bytes >= min_ratio_to_bf16
    assert cache.full_precision_nbytes(2) == batch * heads * (tokens + 5) * 2 * 64 * 2
    at_a_group_boundary = QuantizedKVCache(bits, group_size=128, residual=0)
    fill(at_a_group_boundary, keys[:, :, :tokens], values[:, :, :tokens], 100)
    assert at_a_group_boundary.fp32_tokens == 0 and at_a_group_boundary.nbytes == quantized_bytes
    assert at_a_group_boundary.full_precision_nbytes(2) == bf16_bytes  # from shapes, with no fp32 token left


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("value_group_size", [8, 0])
def test_attention_against_the_codes_equals_attention_against_the_dequantized_cache(bits, value_group_size):
    """One new query (decoding) over 64 quantized tokens and 6 fp32 ones, value groups of 8 or the whole head."""
    keys, values = with_outliers(2, 3, 70, 16), with_outliers(2, 3, 70, 16, seed=1)
    q = torch.randn(2, 3, 1, 16, generator=torch.Generator().manual_seed(2))
    cache = QuantizedKVCache(bits, group_size=8, residual=4, value_group_size=value_group_size)
    fill(cache, keys[:, :, :69], values[:, :, :69], 20)
    layer = cache.append(0, keys[:, :, 69:], values[:, :, 69:])
    assert layer.quantized_tokens == 64
    with pytest.raises(ValueError, match="one query"):
        attend_quantized(q.expand(2, 3, 2, 16), layer.keys, layer.values, layer.recent_keys, layer.recent_values)
    direct = attend_quantized(q, layer.keys, layer.values, layer.recent_keys, layer.recent_values)
    read_keys, read_values = cache.dequantized_layers()[0]
    assert torch.allclose(direct, attend_fp32(q, read_keys, read_values), atol=1e-4)  # values up to ~30
    # ... and differs from attention against the unquantized keys/values (the codes matter).
    assert not torch.allclose(direct, attend_fp32(q, keys, values), atol=1e-3)
    assert math.isfinite(direct.sum().item())
