"""BitLinear: the forward is the hand-written fake quantization, the backward the identity's on the
latent weights, and the swap touches the right layers of both model families."""
import pytest
import torch
import torch.nn.functional as F

from ryzen_core import Transformer, TransformerConfig, hf_model_from_config, tiny_llama_config
from ryzen_plugin_bitnet.quant import BitLinear, quantizable_linears, quantized_input, swap_in_bitlinear


def hand_fake_quant(x, w):
    """BitNet b1.58 by hand: parameter-free RMSNorm, absmax int8 per token, absmean ternary per tensor."""
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    step = x.abs().amax(-1, keepdim=True) / 127
    x_q = torch.clamp(torch.round(x / step), -128, 127) * step
    scale = w.abs().mean()
    w_q = torch.clamp(torch.round(w / scale), -1, 1) * scale
    return x_q @ w_q.T


def layer(in_features=24, out_features=10, seed=0):
    torch.manual_seed(seed)
    return BitLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=False))


def test_forward_equals_the_hand_written_fake_quantization():
    bit = layer()
    x = torch.randn(3, 5, 24)
    expected = hand_fake_quant(x, bit.weight.detach())
    torch.testing.assert_close(bit(x), expected, rtol=1e-6, atol=1e-6)


def test_weights_are_ternary_times_one_scale_and_activations_int8():
    bit = layer()
    x = torch.randn(4, 24)
    captured = {}
    original = F.linear

    def spy(inp, weight, bias=None):
        captured["x"], captured["w"] = inp.detach(), weight.detach()
        return original(inp, weight, bias)

    F.linear = spy
    try:
        bit(x)
    finally:
        F.linear = original
    levels = torch.unique(captured["w"])
    assert len(levels) <= 3 and torch.allclose(levels.abs()[levels != 0], levels.abs().max())
    step = captured["x"].abs().amax(-1, keepdim=True) / 127
    ints = captured["x"] / step
    torch.testing.assert_close(ints, ints.round(), rtol=0, atol=1e-4)


def test_the_straight_through_gradient_on_the_latent_weight_is_the_identitys():
    bit = layer()
    x = torch.randn(6, 24, requires_grad=True)
    upstream = torch.randn(6, 10)
    (bit(x) * upstream).sum().backward()

    # The identity STE: the gradient the quantized weight would get, handed to the latent weight unchanged.
    # The input is quantized by the module's own functions so that only the weight's path is compared.
    w_q = hand_quantized_weight(bit.weight.detach()).requires_grad_()
    q, step = quantized_input(x.detach(), True)
    x_q = q * step
    (F.linear(x_q, w_q) * upstream).sum().backward()
    assert bit.weight.grad is not None and torch.count_nonzero(bit.weight.grad) > 0
    torch.testing.assert_close(bit.weight.grad, w_q.grad, rtol=1e-6, atol=1e-7)
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) > 0


def hand_quantized_weight(w):
    scale = w.abs().mean()
    return torch.clamp(torch.round(w / scale), -1, 1) * scale


def test_without_input_norm_the_input_is_quantized_as_it_comes():
    bit = layer()
    bit.input_norm = False
    x = torch.randn(2, 24) * 5
    step = x.abs().amax(-1, keepdim=True) / 127
    expected = F.linear(torch.clamp(torch.round(x / step), -128, 127) * step, hand_quantized_weight(bit.weight.detach()))
    torch.testing.assert_close(bit(x), expected, rtol=1e-6, atol=1e-6)


def test_the_builtin_transformer_swaps_its_block_linears_not_embeddings_or_head():
    model = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32,
                                          context_length=16, tie_embeddings=False))
    keys = set(model.state_dict())
    names = swap_in_bitlinear(model)
    assert sorted(names) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                   for n in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"))
    assert not isinstance(model.lm_head, BitLinear) and type(model.tok_emb) is torch.nn.Embedding
    assert set(model.state_dict()) == keys  # checkpoints still load into the plain model


def test_an_hf_llama_swaps_its_projections_not_the_lm_head():
    model = hf_model_from_config(tiny_llama_config(64))
    names = swap_in_bitlinear(model)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in names} == projections
    assert "lm_head" not in names and not isinstance(model.lm_head, BitLinear)
    assert all(isinstance(model.get_submodule(n), BitLinear) for n in names)
    logits = model(input_ids=torch.randint(0, 64, (1, 6))).logits
    assert torch.isfinite(logits).all()


def test_a_tied_head_is_never_quantized():
    model = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                          context_length=16, tie_embeddings=True))
    assert "lm_head" not in quantizable_linears(model)


@pytest.mark.parametrize("value", [0.0, 1e-12])
def test_an_all_zero_or_tiny_weight_stays_finite(value):
    bit = layer()
    with torch.no_grad():
        bit.weight.fill_(value)
    assert torch.isfinite(bit(torch.randn(2, 24))).all()
