"""Shared fixtures: one tiny `ryzen run --plugins compression` for the end-to-end tests, a tiny sentence
encoder and pairs in its vocabulary. The tiny configs, hosts and runs come from ryzen_core.testing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ryzen_core.testing import make_config, make_host, run_tiny
from ryzen_plugin_semantic_compression.plugin import CompressionPlugin

# On top of ryzen_core.testing's tiny run: fewer steps and validation rounds, every technique switched on cheaply.
TINY = [
    "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=4",
    "validate.warmup=0", "validate.repeats=1", "validate.max_repeats=1", "validate.perplexity_batches=1",
    "compression.sparsity_target=0.5", "compression.sparsity_step=0.25", "compression.saved_activations=off",
    "compression.saved_activations_target=int8", "compression.minilm=false", "compression.decode_repeats=1",
    "compression.decode_new_tokens=4", "compression.memory_repeats=1", "compression.perplexity_batches=1",
    "compression.sparsity_levels=[0.5]",
]


WORDS = ["sum", "mean", "median", "maximum", "minimum", "length", "product", "variance", "sort", "reverse",
         "count", "first", "last", "unique", "square", "double"]


@pytest.fixture(scope="session")
def word_pairs() -> list[tuple[str, str]]:
    """Query/document pairs in the tiny encoder's vocabulary."""
    return [(f"return the {w} of the items", f"def {w} ( items ) : return {w} items") for w in WORDS]


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny BERT sentence encoder (mean pooling, normalised) in the sentence-transformers layout."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("encoder")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "return", "the", "of", "items", "def", "(", ")", ":",
             *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(path))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    (path / "2_Normalize").mkdir()
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """A small retrieval set in the user format (JSON lines), so the run need not parse the stdlib."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs = [(f"return the {w} of the list", f"def {w}(items):\n    total = 0\n    return {w}_of(items)")
             for w in ("sum", "mean", "median", "maximum", "minimum", "length", "product", "variance")]
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    return path


@pytest.fixture(scope="session")
def compression_run(ryzen_cache_dir, tmp_path_factory, pairs_file, encoder_dir) -> Path:
    """A whole tiny `ryzen run --plugins compression` in this process; the run directory."""
    embedding = [f"compression.embedding_model={encoder_dir}", "compression.embedding_epochs=2",
                 "compression.embedding_batch_size=4", "compression.embedding_max_tokens=16"]
    config = make_config(ryzen_cache_dir, *TINY, *embedding, f"compression.retrieval_sources=[{pairs_file}]",
                         plugins=["compression"], out_dir=tmp_path_factory.mktemp("run") / "r")
    return run_tiny(make_host({"compression": CompressionPlugin}, config), config)
