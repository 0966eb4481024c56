"""Backend recipes for the worker tests. They live in a module of their own (tests/ is on the path) because a
worker process rebuilds a recipe by importing its class by name, which pytest's test modules do not allow."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from ryzen_core.backends import TorchBackend
from ryzen_core.models import Transformer, TransformerConfig

VOCAB = 64


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=VOCAB)).eval()


class FailingBackend(TorchBackend):
    """A tiny torch backend whose generation fails in the chosen way once `fail_after` calls have succeeded."""

    def __init__(self, how: str, fail_after: int, name: str):
        super().__init__(tiny_model(), name)
        self.how, self.calls_left = how, fail_after

    def generate(self, input_ids, max_new_tokens, **sampling):
        if self.calls_left == 0:
            if self.how == "exit":
                os._exit(1)
            if self.how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            if self.how == "hang":
                time.sleep(600)
            raise ValueError("generation failed on purpose")
        self.calls_left -= 1
        return super().generate(input_ids, max_new_tokens, **sampling)


@dataclass(frozen=True)
class FailingRecipe:
    name: str
    how: str = "raise"
    """'raise', 'exit' (the process ends at once), 'segv' (killed by a segfault, as a native engine can be) or
    'hang' (never answers)."""
    fail_after: int = 0

    def build(self):
        return FailingBackend(self.how, self.fail_after, self.name)


@dataclass(frozen=True)
class BrokenRecipe:
    name: str = "broken"

    def build(self):
        raise RuntimeError("cannot load this model")


@dataclass(frozen=True)
class ThreadsRecipe:
    """A tiny torch backend named after what the worker pinned: its torch threads and the isolation flag."""

    name: str = "threads"

    def build(self):
        backend = TorchBackend(tiny_model(), "threads")
        backend.name = f"threads={torch.get_num_threads()} isolated={os.environ.get('RYZEN_BACKEND_ISOLATED')}"
        return backend
