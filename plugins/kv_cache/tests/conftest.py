"""Tiny models for the kvcache plugin's tests: a character tokenizer over a stdlib module's source and the
built-in Transformer and an HF Llama briefly trained on it (peaked logits, so top-1 agreement means
something), with a context long enough that most of a sequence is quantized."""
from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

from ryzen_core.testing import briefly_trained_model

CONTEXT = 256


class CharTokenizer:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]


@pytest.fixture(scope="session")
def corpus() -> str:
    return inspect.getsource(textwrap)


@pytest.fixture(scope="session")
def tokenizer(corpus) -> CharTokenizer:
    return CharTokenizer(corpus)


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread; on a busy machine a second one spins and waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=["builtin", "llama"])
def model(request, tokenizer, corpus):
    shape = {"context_length": CONTEXT} if request.param == "builtin" else {"max_positions": CONTEXT}
    return briefly_trained_model(tokenizer, corpus, kind=request.param, steps=60, seq_len=64, **shape)


@pytest.fixture(scope="session")
def text_ids(tokenizer, corpus) -> torch.Tensor:
    """Two rows of 192 characters of the training text: [2, 192]."""
    return torch.tensor([tokenizer.encode(corpus[3000:3192]), tokenizer.encode(corpus[6000:6192])])
