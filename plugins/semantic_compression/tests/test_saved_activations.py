"""Compressed saved activations: memory measured to go down, gradients to stay close."""
from __future__ import annotations

import torch

from ryzen_core import Transformer, TransformerConfig
from ryzen_plugin_semantic_compression.evaluation import training_step_memory
from ryzen_plugin_semantic_compression.saved_activations import (ActivationCompressor, PeakTensorBytes,
                                                                 _dequantize_rows, _quantize_rows,
                                                                 compressed_saved_activations)


def small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=128, d_model=64, n_heads=2, n_layers=2, d_ff=256,
                                         context_length=64))


def test_peak_tensor_bytes_counts_allocations_and_frees():
    with PeakTensorBytes() as tracker:
        a = torch.empty(1000, 250)  # 1 MB
        b = a.t()  # a view: no new storage
        del a, b
        c = torch.empty(500, 250)
    assert tracker.peak == 1_000_000
    assert tracker.current == 500_000
    del c


def test_int8_rows_round_trip_within_half_a_step():
    t = torch.randn(37, 300) * torch.linspace(0.1, 10, 300)
    codes, low, step = _quantize_rows(t)
    assert codes.dtype == torch.int8
    back = _dequantize_rows(codes, low, step)
    assert ((back - t).abs() <= step / 2 + 1e-5).all()


def test_weights_are_never_copied_and_activations_are():
    model = small_model()
    with compressed_saved_activations("bf16", model) as compressor:
        model(torch.randint(0, 128, (4, 32))).logits.sum()
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert compressor.bytes_in > 0
    assert compressor.bytes_out * 2 == compressor.bytes_in  # bf16: half of every packed fp32 tensor
    assert compressor.bytes_in < weights + 4 * 32 * 64 * 4 * 40  # no weight matrix among them
    packed_weight = ActivationCompressor("bf16", model.parameters()).pack(model.blocks[0].mlp.up.weight.t())
    assert packed_weight[0] == "exact"


def test_each_level_lowers_the_measured_peak_of_a_training_step():
    model = small_model()
    batch = torch.randint(0, 128, (8, 65))
    result = training_step_memory(model, batch, repeats=2)  # one pair has no interval, so no verdict
    off = result["levels"]["off"]["peak_bytes"]
    bf16, int8 = result["levels"]["bf16"]["peak_bytes"], result["levels"]["int8"]["peak_bytes"]
    assert bf16 < off and int8 < bf16
    assert result["levels"]["int8"]["vs_off"]["verdict"] == "smaller"
    assert result["gradient_cosine"]["bf16"] > 0.999 and result["gradient_cosine"]["int8"] > 0.99


def test_gradients_match_without_compression_when_off():
    model = small_model()
    ids = torch.randint(0, 128, (2, 16))
    model(ids).logits.square().mean().backward()
    exact = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with compressed_saved_activations("off", model):
        loss = model(ids).logits.square().mean()
    loss.backward()
    for g, p in zip(exact, model.parameters()):
        torch.testing.assert_close(p.grad, g)
