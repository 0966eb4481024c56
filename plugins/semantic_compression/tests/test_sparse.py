"""Top-k sparse feed-forward activations and the decode path that reads only k rows."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, generate, generate_no_cache
from ryzen_plugin_semantic_compression.sparse import (TopKMLP, apply_topk, current_sparsity, k_for_sparsity,
                                                      keep_top_k, restore_sparsity, save_sparsity, topk_layers)


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=64)).eval()


def test_keep_top_k_leaves_exactly_k_nonzeros_per_row():
    h = torch.randn(3, 5, 64)
    out = keep_top_k(h, 8)
    assert ((out != 0).sum(-1) == 8).all()
    kept = out != 0
    # the kept ones are the largest magnitudes and keep their values
    assert (h.abs()[kept].reshape(3, 5, 8).min(-1).values >= h.abs()[~kept].reshape(3, 5, 56).max(-1).values).all()
    assert torch.equal(out[kept], h[kept])


def test_k_for_sparsity():
    assert k_for_sparsity(512, 0.0) is None
    assert k_for_sparsity(512, 0.75) == 128
    assert k_for_sparsity(8, 0.99) == 1
    with pytest.raises(ValueError):
        k_for_sparsity(8, 1.0)


def test_topk_model_feeds_exactly_k_nonzeros_to_the_down_projection():
    model = tiny_model()
    apply_topk(model, 0.75)
    seen = []
    handles = [layer.down.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
               for layer in topk_layers(model)]
    model.train()
    model(torch.randint(0, 64, (2, 10))).logits.sum().backward()
    for h in handles:
        h.remove()
    assert len(seen) == 2
    assert all(((x != 0).sum(-1) == 16).all() for x in seen)  # d_ff 64 at sparsity 0.75


def test_state_dict_keys_do_not_change():
    plain, sparse = tiny_model(), tiny_model()
    apply_topk(sparse, 0.5)
    assert list(plain.state_dict()) == list(sparse.state_dict())
    sparse.load_state_dict(plain.state_dict())


def test_single_token_decode_reads_only_the_selected_rows():
    model = tiny_model()
    layer = apply_topk(model, 0.75)[0]
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        h = layer.hidden(x)
        dense = layer.down(keep_top_k(h, layer.k))
        # Poison every row the top-k did not pick: a path that touched them would return NaN.
        chosen = h.reshape(-1).abs().topk(layer.k).indices
        poisoned = torch.full_like(layer.down_rows(), float("nan"))
        poisoned[chosen] = layer.down_rows()[chosen]
        layer._rows = poisoned
        sparse = layer(x)
    assert torch.isfinite(sparse).all()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_cached_rows_follow_weight_updates():
    model = tiny_model()
    layer = apply_topk(model, 0.5)[0]
    before = layer.down_rows().clone()
    with torch.no_grad():
        layer.down.weight.add_(1.0)
    torch.testing.assert_close(layer.down_rows(), before + 1.0)


def test_kv_cache_decode_with_the_sparse_path_matches_full_recompute():
    model = tiny_model()
    apply_topk(model, 0.75)
    prompt = torch.randint(0, 64, (1, 6))
    cached = generate(model, prompt, 12)
    recomputed = generate_no_cache(model, prompt, 12)  # full sequences: the masked dense path
    assert torch.equal(cached, recomputed)


def test_dense_setting_restores_the_plain_output():
    plain, sparse = tiny_model(), tiny_model()
    apply_topk(sparse, 0.9)
    ids = torch.randint(0, 64, (1, 8))
    assert not torch.allclose(plain(ids).logits, sparse(ids).logits)
    apply_topk(sparse, 0.0)
    torch.testing.assert_close(plain(ids).logits, sparse(ids).logits)


def test_sparsity_is_saved_and_restored(tmp_path):
    model = tiny_model()
    apply_topk(model, 0.75)
    save_sparsity(model, tmp_path)
    fresh = tiny_model()
    restore_sparsity(fresh, tmp_path)
    assert current_sparsity(fresh) == pytest.approx(0.75)
    assert topk_layers(fresh)[0].k == 16


def test_gated_hf_mlp_is_supported():
    from ryzen_core import hf_model_from_config, tiny_llama_config

    torch.manual_seed(0)
    model = hf_model_from_config(tiny_llama_config(vocab_size=64, hidden=32, intermediate=64)).eval()
    keys = list(model.state_dict())
    layers = apply_topk(model, 0.5)
    assert len(layers) == 2 and all(isinstance(m, TopKMLP) and m.gated for m in layers)
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(generate(model, ids, 6), generate_no_cache(model, ids, 6))
