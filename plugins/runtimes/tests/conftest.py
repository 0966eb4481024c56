"""A tokenizer and tiny, briefly trained models (peaked logits, so quantized top-1 checks mean something)."""
from __future__ import annotations

import inspect

import pytest
import torch

from ryzen_core import Backend, Tokenizer, Transformer, generate, lm_logits, train_tokenizer
from ryzen_core.testing import briefly_trained_model
from ryzen_plugin_runtimes.texts import IDENTITY_TEXTS

# Real prose and code: the identity texts and the docs of the core's model and backend modules.
TRAINING_TEXT = ("\n".join(IDENTITY_TEXTS * 3) + "\n" + (inspect.getmodule(Transformer).__doc__ or "")
                 + (inspect.getmodule(Backend).__doc__ or ""))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer([TRAINING_TEXT], 320, tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="session")
def builtin_model(tokenizer) -> Transformer:
    return briefly_trained_model(tokenizer, TRAINING_TEXT * 4)


@pytest.fixture(scope="session")
def llama_model(tokenizer) -> torch.nn.Module:
    return briefly_trained_model(tokenizer, TRAINING_TEXT * 4, "llama", hidden=64, heads=2, kv_heads=1)


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
