"""Tiny models and tokenizers shared by the rlvr tests (Ryzen's own fixtures come from ryzen_core.testing)."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a machine other jobs share."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def char_tokenizer(ryzen_cache_dir):
    from ryzen_plugin_rlvr.pipeline import character_tokenizer

    return character_tokenizer(ryzen_cache_dir)


@pytest.fixture
def tiny_model(char_tokenizer):
    """A random 2-layer model: its logits vary enough that greedy and sampled paths differ."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=char_tokenizer.vocab_size, d_model=32, n_heads=2, n_layers=2,
                                          d_ff=64, context_length=48))
    with torch.no_grad():  # larger logits than the 0.02-std init, so sampling has structure to follow
        model.lm_head.weight.mul_(20)
    return model.eval()
