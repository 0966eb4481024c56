"""The packed format: the documented bit layout, a bit-exact round trip through safetensors, and its size."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ryzen_core import Transformer, TransformerConfig, hf_model_from_config, tiny_llama_config
from ryzen_plugin_bitnet.packed import load_packed, pack_ternary, save_packed, unpack_ternary
from ryzen_plugin_bitnet.quant import swap_in_bitlinear, ternary_weights


def test_the_bit_layout_is_the_documented_one():
    # codes t + 1, first weight in the low bits, a short row padded with code 1 (zero)
    row = torch.tensor([[-1, 0, 1, 1, 0]])
    assert pack_ternary(row).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 1 << 2 | 1 << 4 | 1 << 6]]


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (5, 7), (17, 13), (64, 257)])
def test_pack_then_unpack_gives_the_same_integers(shape):
    t = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 4))
    assert torch.equal(unpack_ternary(packed, shape[1]), t)


@pytest.mark.parametrize("kind", ["builtin", "llama"])
def test_save_then_load_is_bit_exact(tmp_path, kind):
    torch.manual_seed(0)
    model = (Transformer(TransformerConfig(vocab_size=64, d_model=24, n_heads=2, n_layers=2, d_ff=40,
                                           context_length=16)) if kind == "builtin"
             else hf_model_from_config(tiny_llama_config(64)))
    names = swap_in_bitlinear(model)
    stats = save_packed(model, tmp_path / "ternary.safetensors")
    loaded = load_packed(tmp_path / "ternary.safetensors")
    assert sorted(loaded) == sorted(names)
    for name in names:
        t, scale = ternary_weights(model.get_submodule(name).weight)
        got_t, got_scale, bias = loaded[name]
        assert torch.equal(got_t, t.to(torch.int8)) and torch.equal(got_scale, scale.reshape(1)) and bias is None
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    assert stats["weights"] == weights and stats["bf16_bytes"] == 2 * weights
    # 2 bits per weight (rows padded to whole bytes) plus 4 bytes of scale per layer
    padded = sum(w.shape[0] * -(-w.shape[1] // 4) for w in (model.get_submodule(n).weight for n in names))
    assert stats["packed_bytes"] == padded + 4 * len(names)
    assert stats["bf16_bytes"] / stats["packed_bytes"] >= 7


def test_a_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x.packed": torch.zeros(1, 1, dtype=torch.uint8)}, str(path), metadata={"format": "gguf"})
    with pytest.raises(ValueError, match="not a ryzen-bitnet-i2"):
        load_packed(path)


def test_a_packed_tensor_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"x.packed": torch.zeros(2, 1, dtype=torch.uint8), "x.scale": torch.ones(1)}, str(path),
              metadata={"format": "ryzen-bitnet-i2", "version": "1", "shapes": json.dumps({"x": [2, 9]})})
    with pytest.raises(ValueError, match="shape"):
        load_packed(path)
