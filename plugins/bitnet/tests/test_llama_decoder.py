"""The lean ternary Llama step gives transformers' logits and Ryzen's generated tokens, through prefill, one
token at a time, chunks after a cache, batches and a cache that grows; it refuses models it does not reproduce."""
import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, generate, hf_model_from_config, lm_logits, tiny_llama_config
from ryzen_plugin_bitnet.kernel import ternary_model
from ryzen_plugin_bitnet.llama_decoder import decoder_for

VOCAB = 300


def ternary_llama(max_positions: int = 128, kernel: str = "int32"):
    torch.manual_seed(0)
    model = hf_model_from_config(tiny_llama_config(vocab_size=VOCAB, max_positions=max_positions)).eval()
    return ternary_model(model, kernel=kernel)


def prompts(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_prefill_steps_and_chunks_give_the_models_own_logits():
    model = ternary_llama()
    decoder, why_not = decoder_for(model)
    assert why_not is None
    ids = prompts(2, 12)
    reference = lm_logits(model, ids)
    assert torch.allclose(decoder.forward(ids, 0), reference, atol=1e-5, rtol=0)
    decoder.forward(ids[:, :5], 0)
    for position in range(5, 12):  # one token at a time on the cache
        step = decoder.forward(ids[:, position:position + 1], position)[:, 0]
        assert torch.allclose(step, reference[:, position], atol=1e-5, rtol=0)
    decoder.forward(ids[:, :5], 0)
    assert torch.allclose(decoder.forward(ids[:, 5:], 5), reference[:, 5:], atol=1e-5, rtol=0)  # a chunk after it


def test_greedy_and_seeded_sampling_equal_ryzens_loop_and_the_cache_grows():
    model = ternary_llama(max_positions=512)
    decoder, _ = decoder_for(model)
    ids = prompts(3, 20)
    with torch.inference_mode():
        assert torch.equal(decoder.generate(ids, 150), generate(model, ids, 150))  # past the first 128 positions
        assert decoder.cache[0][0].shape[2] >= 170
        sampled = [fn(ids, 16, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
                   for fn in (decoder.generate, lambda *a, **k: generate(model, *a, **k))]
    assert torch.equal(*sampled)


def test_it_refuses_what_it_does_not_reproduce():
    builtin = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                           context_length=16))
    assert decoder_for(ternary_model(builtin))[1] == "not a LlamaForCausalLM"
    torch.manual_seed(0)
    plain = hf_model_from_config(tiny_llama_config(vocab_size=VOCAB))
    assert decoder_for(plain)[1] == "a projection that is not a TernaryLinear"
    decoder, _ = decoder_for(ternary_llama())
    with pytest.raises(ValueError, match="exceed the model's 128 positions"):
        decoder.generate(prompts(1, 100), 29)
