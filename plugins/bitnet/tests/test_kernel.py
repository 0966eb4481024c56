"""The ternary layer: its int32 accumulators are exactly the fake-quant reference's integer products,
on random shapes (odd sizes, batch 1), with the C++ kernel, torch._int_mm and the int32 matmul; whole
models built from the packed file give the fake-quant model's logits. test_cpp_kernel.py tests the C++
kernel itself."""
import platform

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, generate, hf_model_from_config, lm_logits, tiny_llama_config
from ryzen_plugin_bitnet import cpp_kernel
from ryzen_plugin_bitnet.head import head_kind
from ryzen_plugin_bitnet.kernel import TernaryLinear, int8_matmul, load_ternary_model, ternary_model
from ryzen_plugin_bitnet.packed import save_packed
from ryzen_plugin_bitnet.quant import BitLinear, quantized_input, swap_in_bitlinear, ternary_weights

needs_compiler = pytest.mark.skipif(
    cpp_kernel.compiler() is None or platform.machine().lower() not in ("x86_64", "amd64"),
    reason=f"no C++ compiler (set CXX or install g++), or not x86-64 ({platform.machine()})")
KERNELS = ["int_mm", "int32", pytest.param("cpp", marks=needs_compiler)]
SHAPES = [(1, 1, 7, 5), (1, 1, 256, 768), (1, 3, 33, 17), (3, 5, 64, 130), (2, 17, 129, 31), (4, 9, 512, 256)]


def bitlinear(in_features, out_features, seed):
    torch.manual_seed(seed)
    return BitLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=False))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch,seq,in_features,out_features", SHAPES)
def test_integer_results_equal_the_fake_quant_reference_exactly(kernel, batch, seq, in_features, out_features):
    reference = bitlinear(in_features, out_features, seed=in_features)
    t, scale = ternary_weights(reference.weight)
    layer = TernaryLinear(t.to(torch.int8), scale, kernel=kernel)
    x = torch.randn(batch, seq, in_features) * 3

    acc, step = layer.integer_forward(x)
    # the reference's own integers: what BitLinear's forward multiplies, before the float rescale
    q, ref_step = quantized_input(x, True)
    exact = q.reshape(-1, in_features).double() @ t.double().T  # exact: every product and sum is a small integer
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), exact)
    torch.testing.assert_close(step, ref_step.reshape(-1, 1), rtol=0 if kernel != "cpp" else 3e-7, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_the_int_mm_kernel_is_chosen_where_it_runs_and_the_fallback_gives_the_same_result():
    t, scale = ternary_weights(torch.randn(31, 45))
    fast = TernaryLinear(t.to(torch.int8), scale, kernel="torch")
    slow = TernaryLinear(t.to(torch.int8), scale, kernel="int32")
    assert fast.kernel == "int_mm"  # torch 2.13 on CPU multiplies any shape, batch 1 included
    x = torch.randn(1, 45)
    assert torch.equal(fast(x), slow(x))
    a = torch.randint(-128, 128, (3, 45), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, t.to(torch.int8).T, "int_mm"), int8_matmul(a, t.to(torch.int8).T, "int32"))


def test_a_layer_with_bias_adds_it():
    torch.manual_seed(0)
    reference = BitLinear.from_linear(torch.nn.Linear(20, 6, bias=True))
    t, scale = ternary_weights(reference.weight)
    layer = TernaryLinear(t.to(torch.int8), scale, reference.bias.detach())
    x = torch.randn(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["builtin", "llama"])
def test_a_model_from_the_packed_file_gives_the_fake_quant_models_logits(tmp_path, kind):
    torch.manual_seed(0)
    model = (Transformer(TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=48,
                                           context_length=32)) if kind == "builtin"
             else hf_model_from_config(tiny_llama_config(64)))
    swap_in_bitlinear(model)
    save_packed(model, tmp_path / "ternary.safetensors")
    ternary = load_ternary_model(model, tmp_path / "ternary.safetensors")
    assert not any(isinstance(m, BitLinear) for m in ternary.modules())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(ternary, ids), lm_logits(model.eval(), ids), rtol=1e-4, atol=1e-4)
        out = generate(ternary, ids[:1, :4], 6)
    assert out.shape == (1, 10)


def test_a_stale_packed_file_is_an_error_not_another_model(tmp_path):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16)
    trained, other = Transformer(config), Transformer(config)
    swap_in_bitlinear(trained)
    save_packed(trained, tmp_path / "ternary.safetensors")
    with pytest.raises(ValueError, match="not the quantized weights"):
        load_ternary_model(other, tmp_path / "ternary.safetensors")


def test_a_plain_model_is_quantized_like_its_bitlinear_twin():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16)
    plain = Transformer(config)
    twin = Transformer(config)
    twin.load_state_dict(plain.state_dict())  # what a validation worker has: the checkpoint in a plain model
    swap_in_bitlinear(twin)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(lm_logits(ternary_model(plain), ids), lm_logits(ternary_model(twin), ids))


@pytest.mark.parametrize("llama", [False, True])
def test_the_int8_head_reads_a_quarter_of_the_bytes_and_keeps_the_logits_close(llama):
    from ryzen_plugin_bitnet.plugin import decode_weight_bytes

    torch.manual_seed(0)
    model = (hf_model_from_config(tiny_llama_config(vocab_size=512)) if llama else
             Transformer(TransformerConfig(vocab_size=512, d_model=64, n_heads=2, n_layers=1, d_ff=128,
                                           context_length=32)))
    embed = (lambda m: m.get_input_embeddings()) if llama else (lambda m: m.tok_emb)
    embedding = embed(model).weight.detach().clone()
    full, int8 = ternary_model(model, kernel="int32"), ternary_model(model, kernel="int32", head="int8")
    assert head_kind(full) == "fp32" and head_kind(int8).startswith("int8")
    assert torch.equal(embed(int8).weight, embedding)  # a tied embedding is left as it was
    head = model.lm_head.weight
    assert decode_weight_bytes(full) - decode_weight_bytes(int8) == 3 * head.numel() - 4 * head.shape[0]
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, quantized = lm_logits(full, ids), lm_logits(int8, ids)
    assert not torch.equal(reference, quantized)  # the head really changed
    error = (quantized - reference).abs().max() / reference.abs().max()
    assert error < 0.05, float(error)
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_an_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head must be fp32 or int8"):
        ternary_model(Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                                    context_length=16)), head="int4")
