"""Shared fixtures: one tiny `ryzen run --plugins compression` for the end-to-end tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "model.preset=tiny", "data.max_documents=12", "data.vocab_size=300", "data.seq_len=32",
    "train.batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1",
    "train.checkpoint_every=4", "train.warmup_steps=2",
    "validate.prompt_len=8", "validate.new_tokens=4", "validate.batch_sizes=[1]", "validate.warmup=0",
    "validate.repeats=1", "validate.perplexity_batches=1",
    "compression.sparsity_target=0.5", "compression.sparsity_step=0.25", "compression.saved_activations=off",
    "compression.saved_activations_target=int8", "compression.minilm=false", "compression.decode_repeats=1",
    "compression.decode_new_tokens=4", "compression.memory_repeats=1", "compression.perplexity_batches=1",
    "compression.sparsity_levels=[0.5]",
]


@pytest.fixture(scope="session")
def ryzen(tmp_path_factory):
    """Run `ryzen ARGS` in a subprocess with a private data cache; returns CompletedProcess."""
    cache = tmp_path_factory.mktemp("ryzen-cache")

    def run(*args: str, timeout: float = 240):
        env = dict(os.environ, RYZEN_CACHE_DIR=str(cache), CI="1", HF_HUB_OFFLINE="1")
        return subprocess.run([sys.executable, "-m", "ryzen_core.cli", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """A small retrieval set in the user format (JSON lines), so the run need not parse the stdlib."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs = [(f"return the {w} of the list", f"def {w}(items):\n    total = 0\n    return {w}_of(items)")
             for w in ("sum", "mean", "median", "maximum", "minimum", "length", "product", "variance")]
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    return path


@pytest.fixture(scope="session")
def compression_run(ryzen, tmp_path_factory, pairs_file) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    args = ["run", "--plugins", "compression", "--out", str(out)]
    for item in [*TINY, f"compression.retrieval_sources=[{pairs_file}]"]:
        args += ["--set", item]
    result = ryzen(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
