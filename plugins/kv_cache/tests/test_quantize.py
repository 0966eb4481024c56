"""Group quantization: every element within scale/2 of its group, constant groups exact, 4-bit codes
packed two per byte, and the cache's layout (keys per channel, values per token, fp32 residual)."""
from __future__ import annotations

import pytest
import torch

from ryzen_plugin_kv_cache import QuantizedKVCache, quantize


def with_outliers(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    x[..., 3] *= 20  # one outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_within_half_a_step_of_each_group(bits):
    x = with_outliers(2, 3, 10, 32)
    q = quantize(x, bits, group=8)
    error = (q.dequantize() - x).abs().unflatten(-1, (-1, 8))
    step = q.scale.unsqueeze(-1)
    assert bool((error <= step / 2 + 1e-5 * x.abs().max()).all())
    assert error.max() > 0  # a lossy code; the bound is not met by returning x
    assert q.codes.shape[-1] == (32 if bits == 8 else 16)  # 4-bit: two codes per byte
    assert q.codes.dtype == torch.uint8


def test_more_bits_smaller_error_and_constant_groups_exact():
    x = with_outliers(4, 64)
    errors = {bits: (quantize(x, bits, 16).dequantize() - x).abs().max().item() for bits in (8, 4)}
    assert errors[8] < errors[4] / 8
    constant = torch.full((2, 16), 1.5)
    assert torch.equal(quantize(constant, 4, 16).dequantize(), constant)


def test_bad_group_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.zeros(2, 10), 8, 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_quantizes_whole_groups_beyond_the_residual_and_reads_within_bounds(bits):
    keys, values = with_outliers(1, 2, 75, 16), torch.randn(1, 2, 75, 16)
    cache = QuantizedKVCache(bits, group_size=8, residual=10)
    cache.append([(keys[:, :, :40], values[:, :, :40])])
    for t in range(40, 75):  # then one token at a time, as decoding does
        cache.append([(keys[:, :, t:t + 1], values[:, :, t:t + 1])])
    layer = cache.layers[0]
    assert len(cache) == 75 and layer.recent_keys.shape[2] == 11  # 64 quantized (8 groups), 11 in fp32
    read_keys, read_values = cache.read()[0]
    assert torch.equal(read_keys[:, :, 64:], keys[:, :, 64:])
    # Keys: one scale per channel per group of 8 tokens; values: one per token per 8 channels.
    key_step = layer.keys.scale.repeat_interleave(8, dim=-1).transpose(-1, -2)
    value_step = layer.values.scale.repeat_interleave(8, dim=-1)
    assert bool(((read_keys[:, :, :64] - keys[:, :, :64]).abs() <= key_step / 2 + 1e-4).all())
    assert bool(((read_values[:, :, :64] - values[:, :, :64]).abs() <= value_step / 2 + 1e-4).all())
    assert layer.keys.scale.shape == (1, 2, 16, 8) and layer.values.scale.shape == (1, 2, 64, 2)
    codes = 2 * 64 * 2 * 16 * bits // 8  # keys and values, 64 tokens, 2 heads, 16 channels
    metadata = 2 * 4 * (2 * 16 * 8 + 64 * 2 * 2)  # a scale and a minimum per group, fp32
    assert cache.nbytes == codes + metadata + 2 * 11 * 2 * 16 * 4
    assert cache.full_precision_nbytes(4) == 2 * 75 * 2 * 16 * 4
