"""A tokenizer and tiny, briefly trained models (peaked logits, so quantized top-1 checks mean something)."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import backends
from ryzen_core.data import Tokenizer, train_tokenizer
from ryzen_core.models import transformer
from ryzen_core.models import (Transformer, TransformerConfig, generate, hf_model_from_config, lm_logits,
                               tiny_llama_config)
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

TRAINING_TEXT = "\n".join(IDENTITY_TEXTS * 3) + "\n" + (transformer.__doc__ or "") + (backends.__doc__ or "")


def fit(model: torch.nn.Module, tokenizer: Tokenizer, steps: int = 30, seq: int = 24) -> torch.nn.Module:
    ids = torch.tensor(tokenizer.encode(TRAINING_TEXT * 4))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (8,), generator=generator)
        batch = torch.stack([ids[s:s + seq + 1] for s in starts])
        logits = lm_logits(model, batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer([TRAINING_TEXT], 320, tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="session")
def builtin_model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return fit(Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer)


@pytest.fixture(scope="session")
def llama_model(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return fit(hf_model_from_config(tiny_llama_config(tokenizer.vocab_size, hidden=64, heads=2, kv_heads=1)), tokenizer)


@pytest.fixture
def prompts(tokenizer) -> torch.Tensor:
    ids = tokenizer.encode(TRAINING_TEXT)
    return torch.tensor([ids[:10], ids[40:50]])


@pytest.fixture
def follows_torch(prompts):
    """Checks that an fp32 backend gives the torch model's logits and greedy tokens, one on_token per token."""
    def check(backend, model, atol: float, new_tokens: int = 10) -> None:
        with torch.inference_mode():
            expected = lm_logits(model, prompts)
            expected_ids = generate(model, prompts, new_tokens)
        torch.testing.assert_close(backend.logits(prompts), expected, atol=atol, rtol=0)
        steps = []
        assert torch.equal(backend.generate(prompts, new_tokens, on_token=steps.append), expected_ids)
        assert steps == list(range(new_tokens))

    return check
