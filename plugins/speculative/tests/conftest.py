"""Tiny models for the speculative plugin's tests: a character tokenizer over a stdlib module's source, and
the built-in Transformer and an HF Llama sized to it, seeded, with their matrices drawn at std 0.1.

At the default init (std 0.02) a random model's greedy output settles into a loop that prompt lookup
always predicts; at 0.1 it wanders, so some drafts are kept and many are rejected, and both paths of
verification (and the cache rollback) run. Training instead would take minutes on a busy 2-core machine."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, hf_model_from_config, tiny_llama_config

WEIGHT_STD = 0.1


@pytest.fixture(scope="session")
def corpus(char_corpus) -> str:
    return char_corpus


@pytest.fixture(scope="session")
def tokenizer(char_tokenizer):
    return char_tokenizer


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here on one thread (ryzen_core.testing's one_torch_thread)."""


def tiny_model(kind: str, vocab_size: int, seed: int = 0, std: float = WEIGHT_STD) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "builtin":
        model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=vocab_size, context_length=256))
    else:
        model = hf_model_from_config(tiny_llama_config(vocab_size, max_positions=256))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_model():
    """tiny_model(kind, vocab_size, seed=0, std=0.1), for a test that needs a second model."""
    return tiny_model


@pytest.fixture(scope="session", params=["builtin", "llama"])
def model(request, tokenizer):
    return tiny_model(request.param, tokenizer.vocab_size)


@pytest.fixture(scope="session")
def small_model():
    """A built-in model over 6 tokens whose next-token distributions are uneven but far from one-hot, so
    every continuation of 4 tokens can be counted (1296 cells)."""
    return tiny_model("builtin", 6, seed=1, std=0.4)


@pytest.fixture(scope="session")
def prompt_suite(tokenizer, corpus) -> list[torch.Tensor]:
    """Prompts [1, T]: repetitive ones (drafts accepted), code from the training text, and random tokens
    (drafts rejected)."""
    texts = ["self.width = width\n        self.width = width\n        self.", "aaaa aaaa aaaa aaaa aa",
             corpus[2000:2080], corpus[5000:5060], corpus[9000:9040]]
    prompts = [torch.tensor([tokenizer.encode(t)]) for t in texts]
    generator = torch.Generator().manual_seed(0)
    prompts += [torch.randint(0, tokenizer.vocab_size, (1, length), generator=generator) for length in (5, 17, 40)]
    return prompts
