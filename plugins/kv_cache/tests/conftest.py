"""Tiny models for the kvcache plugin's tests: a character tokenizer over a stdlib module's source and the
built-in Transformer and an HF Llama briefly trained on it (peaked logits, so top-1 agreement means
something), with a context long enough that most of a sequence is quantized."""
from __future__ import annotations

import pytest
import torch

from ryzen_core.testing import briefly_trained_model

CONTEXT = 256


@pytest.fixture(scope="session")
def corpus(char_corpus) -> str:
    return char_corpus


@pytest.fixture(scope="session")
def tokenizer(char_tokenizer):
    return char_tokenizer


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here on one thread (ryzen_core.testing's one_torch_thread)."""


@pytest.fixture(scope="session", params=["builtin", "llama"])
def model(request, tokenizer, corpus):
    shape = {"context_length": CONTEXT} if request.param == "builtin" else {"max_positions": CONTEXT}
    return briefly_trained_model(tokenizer, corpus, kind=request.param, steps=60, seq_len=64, **shape)


@pytest.fixture(scope="session")
def text_ids(tokenizer, corpus) -> torch.Tensor:
    """Two rows of 192 characters of the training text: [2, 192]."""
    return torch.tensor([tokenizer.encode(corpus[3000:3192]), tokenizer.encode(corpus[6000:6192])])
