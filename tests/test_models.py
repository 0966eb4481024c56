"""Tests for ryzen_core.models: built-in Transformer, HF adapters, generation."""

import math
import subprocess
import sys

import pytest
import torch

from ryzen_core.models import (
    PRESETS,
    Transformer,
    TransformerConfig,
    generate,
    generate_no_cache,
    hf_model_from_config,
    is_hf_model,
    last_hidden,
    lm_logits,
    load_hf_model,
    model_outputs,
    sample_next,
    save_hf_model,
    tiny_llama_config,
)
from ryzen_core.models.generate import generate_no_cache as generate_no_cache_direct


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = hf_model_from_config(tiny_llama_config(vocab_size=97))
    out_dir = tmp_path_factory.mktemp("tiny_llama")
    save_hf_model(model, out_dir)
    return out_dir, model.eval()


# ---------------------------------------------------------------- config / presets


def test_config_round_trip_and_presets():
    config = TransformerConfig.from_preset("simple", vocab_size=300, tie_embeddings=False)
    assert config.vocab_size == 300 and config.d_model == 256 and not config.tie_embeddings
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert PRESETS["tiny"] == dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, d_ff=64, context_length=64)
    assert PRESETS["scaled"]["d_model"] == 512 and PRESETS["scaled"]["n_layers"] == 4
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=10, d_model=30, n_heads=4, n_layers=1, d_ff=8, context_length=8)
    with pytest.raises(ValueError, match="unknown"):
        TransformerConfig.from_dict({**PRESETS["tiny"], "n_embd": 3})


def test_importing_models_does_not_import_transformers():
    code = "import sys, ryzen_core.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- built-in model


def test_forward_shapes_and_cache_layout():
    model = tiny_model()
    ids = torch.randint(0, 256, (3, 7))
    out = model(ids, use_cache=True)
    assert out.logits.shape == (3, 7, 256)
    assert out.hidden.shape == (3, 7, 32)
    assert len(out.past_key_values) == 2
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (3, 2, 7, 16)
    assert model(ids).past_key_values is None
    # hidden is the LM head's input.
    assert torch.allclose(model.lm_head(out.hidden), out.logits)


def test_parameter_count_matches_hand_computation():
    d, ff, vocab, ctx, layers = 32, 64, 256, 64, 2
    per_block = 4 * d * d + 2 * d * ff + 2 * d  # qkv + proj, up + down, two bias-free LayerNorms
    non_embedding = layers * per_block + d  # + final norm
    tied = tiny_model()
    assert tied.num_parameters(non_embedding=True) == non_embedding
    assert tied.num_parameters() == non_embedding + vocab * d + ctx * d
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_parameters() == non_embedding + 2 * vocab * d + ctx * d
    assert untied.num_parameters(non_embedding=True) == non_embedding
    assert tied.flops_per_token() == 6 * (non_embedding + vocab * d) + 12 * layers * d * ctx
    assert untied.flops_per_token() == tied.flops_per_token()  # the head matmul costs the same either way


def test_tied_embeddings_share_storage_untied_do_not():
    tied = tiny_model()
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    # Tied weights get gradient from both uses.
    ids = torch.randint(0, 256, (1, 5))
    tied.train()
    tied(ids).logits.sum().backward()
    assert tied.tok_emb.weight.grad is tied.lm_head.weight.grad


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, d_model=256, n_heads=4, n_layers=8, d_ff=512, context_length=16)
    model = Transformer(config)
    expected = 0.02 / math.sqrt(2 * config.n_layers)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_causality_future_token_does_not_change_past_logits():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("chunk", [1, 4])
def test_cached_logits_match_full_sequence(chunk):
    # chunk > 1 exercises the explicit mask for several new tokens over a cache.
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        past, pieces = None, []
        for start in range(0, 13, chunk):
            out = model(ids[:, start : start + chunk], past_key_values=past, use_cache=True)
            past = out.past_key_values
            pieces.append(out.logits)
    assert past[0][0].shape[2] == 13
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_exceeding_context_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="context_length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    out = model(torch.zeros(1, 60, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 5, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match=r"60.*10.*70.*64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_mlp_activation_is_swappable():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 6))
    before = model(ids).logits

    class ZeroActivation(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    for block in model.blocks:
        block.mlp.activation = ZeroActivation()
    assert not torch.allclose(model(ids).logits, before)


def test_dropout_is_active_only_in_training_and_generate_restores_mode():
    model = tiny_model(dropout=0.5)
    ids = torch.randint(0, 256, (1, 8))
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    a = generate(model, ids, max_new_tokens=5)
    b = generate(model, ids, max_new_tokens=5)
    assert torch.equal(a, b)  # generation ran in eval mode
    assert model.training  # and the mode was restored


# ---------------------------------------------------------------- sampling


def test_greedy_and_top_k_one_pick_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=gen), logits.argmax(-1))


def test_sampling_reproducible_with_seed_and_differs_across_seeds():
    logits = torch.zeros(8, 1000)  # uniform: many possible outcomes

    def draw(seed):
        return sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_top_p_never_samples_outside_nucleus():
    # probabilities 0.5, 0.3, 0.1, 0.05, 0.05: the 0.7 nucleus is {0, 1} (0.5 alone is short).
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    logits = probs.log().repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)
    assert set(tokens.tolist()) == {0, 1}
    # top_p that only the best token fills degenerates to greedy.
    tokens = sample_next(logits, temperature=1.0, top_p=0.4, generator=gen)
    assert set(tokens.tolist()) == {0}
    # top_k and top_p combine: top_k=3 then top_p=0.95 of the renormalised {0.5,0.3,0.1}.
    tokens = sample_next(logits, temperature=1.0, top_k=3, top_p=0.95, generator=gen)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_sample_next_validates_arguments():
    logits = torch.randn(1, 5)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError):
        sample_next(logits[0])


# ---------------------------------------------------------------- generation (built-in)


def test_builtin_cached_generation_matches_no_cache():
    model = tiny_model()
    prompt = torch.randint(0, 256, (3, 5))
    cached = generate(model, prompt, max_new_tokens=20)
    reference = generate_no_cache(model, prompt, max_new_tokens=20)
    assert cached.shape == (3, 25)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, reference)


def test_builtin_sampled_generation_matches_no_cache_with_same_seed():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 4))
    kwargs = dict(max_new_tokens=15, temperature=0.9, top_k=50, top_p=0.9)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate_no_cache(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(a, b)


def test_generate_stops_when_all_rows_hit_eos_and_pads_finished_rows():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 3))
    free_run = generate(model, prompt, max_new_tokens=12)
    # Use the token row 0 produces at its 3rd step as eos: row 0 stops there.
    eos = int(free_run[0, 3 + 2])
    out = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)
    row0_new = out[0, 3:]
    first_eos = int((row0_new == eos).nonzero()[0])
    assert torch.all(row0_new[first_eos:] == eos)
    row1_hits = (out[1, 3:] == eos).nonzero()
    if len(row1_hits):  # all rows finished: generation must have stopped at the later finisher
        assert out.shape[1] == 3 + max(first_eos, int(row1_hits[0])) + 1
    else:
        assert out.shape[1] == 3 + 12
    assert torch.equal(out, generate_no_cache(model, prompt, max_new_tokens=12, eos_token_id=eos))


def test_generate_early_stop_single_row():
    model = tiny_model()
    prompt = torch.randint(0, 256, (1, 3))
    free_run = generate(model, prompt, max_new_tokens=8)
    eos = int(free_run[0, 3])  # the very first generated token
    steps = []
    out = generate(model, prompt, max_new_tokens=8, eos_token_id=eos, on_token=steps.append)
    assert out.shape == (1, 4) and steps == [0]


def test_on_token_called_once_per_token_in_order():
    model = tiny_model()
    steps = []
    generate(model, torch.randint(0, 256, (1, 4)), max_new_tokens=6, on_token=steps.append)
    assert steps == list(range(6))
    assert torch.equal(generate(model, torch.ones(1, 4, dtype=torch.long), max_new_tokens=0), torch.ones(1, 4, dtype=torch.long))


def test_adapters_on_builtin():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 6))
    logits, past = model_outputs(model, ids)
    assert torch.allclose(logits, lm_logits(model, ids))
    step_logits, past = model_outputs(model, ids[:, :1], past)
    assert past[0][0].shape[2] == 7
    assert last_hidden(model, ids).shape == (2, 6, 32)
    assert not is_hf_model(model)
    assert generate_no_cache is generate_no_cache_direct


# ---------------------------------------------------------------- Hugging Face


def test_hf_save_load_round_trip_gives_identical_logits(hf_llama_dir):
    path, original = hf_llama_dir
    assert (path / "model.safetensors").is_file()
    loaded = load_hf_model(path)
    assert is_hf_model(loaded) and not loaded.training
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(lm_logits(loaded, ids), lm_logits(original, ids))
    assert last_hidden(loaded, ids).shape == (2, 9, 64)
    # last_hidden is the LM head's input, as for the built-in model.
    assert torch.allclose(loaded.lm_head(last_hidden(loaded, ids)), lm_logits(loaded, ids), atol=1e-5)


def test_hf_cached_generation_matches_no_cache(hf_llama_dir):
    path, _ = hf_llama_dir
    model = load_hf_model(path)
    prompt = torch.randint(0, 97, (2, 6))
    cached = generate(model, prompt, max_new_tokens=12)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, generate_no_cache(model, prompt, max_new_tokens=12))


def test_hf_cached_step_logits_match_full_sequence(hf_llama_dir):
    path, _ = hf_llama_dir
    model = load_hf_model(path)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        _, past = model_outputs(model, ids[:, :9])
        step_logits, _ = model_outputs(model, ids[:, 9:], past)
        full = lm_logits(model, ids)
    assert torch.allclose(step_logits[:, -1], full[:, -1], atol=1e-5)


def test_hf_model_from_config_overrides_vocab_and_reads_json(tmp_path, hf_llama_dir):
    path, _ = hf_llama_dir
    model = hf_model_from_config(path / "config.json", vocab_size=50)
    assert model.config.vocab_size == 50
    assert model.get_output_embeddings().weight.shape == (50, 64)
    with pytest.raises(ValueError, match="model_type"):
        hf_model_from_config({"vocab_size": 10})


def test_load_hf_model_without_config_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no config.json") as info:
        load_hf_model(tmp_path)
    assert str(tmp_path) in str(info.value)
