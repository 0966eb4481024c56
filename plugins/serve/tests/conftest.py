"""One tiny `ryzen train` run for the whole session: every test serves its model."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import context_length, generate, load_trained_model
from ryzen_core.testing import make_config, make_host, train_run_tiny


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, ryzen_cache_dir):
    config = make_config(ryzen_cache_dir, out_dir=tmp_path_factory.mktemp("serve") / "run")
    return train_run_tiny(make_host(), config)


@pytest.fixture(scope="session")
def loaded(trained_run):
    """(model, tokenizer, context length) of the trained run."""
    model, tokenizer, _ = load_trained_model(trained_run)
    return model, tokenizer, context_length(model)


@pytest.fixture(scope="session")
def greedy(loaded):
    """greedy(prompt, n) -> the new token ids `ryzen_core.generate` makes, the end-of-text token left out."""
    model, tokenizer, _ = loaded

    def run(prompt: str, new_tokens: int) -> list[int]:
        ids = tokenizer.encode(prompt)
        out = generate(model, torch.tensor([ids]), new_tokens, eos_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
        return out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out

    return run
