"""Tiny models for the speculative plugin's tests: a character tokenizer over a stdlib module's source, and
the built-in Transformer and an HF Llama sized to it, seeded, with their matrices drawn at std 0.1.

At the default init (std 0.02) a random model's greedy output settles into a loop that prompt lookup
always predicts; at 0.1 it wanders, so some drafts are kept and many are rejected, and both paths of
verification (and the cache rollback) run. Training instead would take minutes on a busy 2-core machine."""
from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, hf_model_from_config, tiny_llama_config

WEIGHT_STD = 0.1


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
    """Models this small decode fastest on one thread; on a busy machine a second one spins and waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session", params=["builtin", "llama"])
def model(request, tokenizer):
    return tiny_model(request.param, tokenizer.vocab_size)


@pytest.fixture(scope="session")
def small_model():
    """A built-in model over 6 tokens whose next-token distributions are uneven but far from one-hot, so
    every continuation of 3 tokens can be counted (216 cells)."""
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
