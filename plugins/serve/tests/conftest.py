"""One tiny `ryzen train` run for the whole session: every test serves its model."""
from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner

from ryzen_core import context_length, generate, load_trained_model
from ryzen_core.testing import make_config, make_host, train_run_tiny
from ryzen_plugin_serve import plugin


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_torch_thread):
    """The tiny model decodes on one torch thread here, as the server processes the tests start do
    (`--threads 1`): on a busy machine a second thread spins and waits (100 three-token requests took
    30 s of server CPU on two threads against 0.3 s on one)."""


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


def command_group() -> click.Group:
    """A group shaped like the core's `ryzen` (with a `bench` group) that only this plugin's commands join."""
    @click.group()
    def cli():
        pass

    @cli.group("bench")
    def bench():
        pass

    plugin.register_commands(cli)
    return cli


@pytest.fixture
def ryzen():
    """ryzen(*args): `ryzen ARGS` in this process, with the serve plugin's commands -> click Result."""
    return lambda *args: CliRunner().invoke(command_group(), list(args))
