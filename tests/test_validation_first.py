"""Validation first: a config whose parts do not fit together is refused in one line, exit 2, before any
data is prepared or any file written."""
from __future__ import annotations

import json

import tokenizers

from helpers import tiny_sets
from ryzen_core.data import Tokenizer
from ryzen_core.models import hf_model_from_config, save_hf_model, tiny_llama_config


def refused(result, out, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("Error: config error:"), result.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_seq_len_longer_than_the_preset_context_is_refused_before_any_work(ryzen, tmp_path):
    out = tmp_path / "run"
    refused(ryzen("train", "--set", "model.preset=tiny", "--out", str(out)), out,
            "data.seq_len (128)", "context of 64", "model.preset 'tiny'")
    refused(ryzen("run", *tiny_sets("model.context_length=16"), "--out", str(out)), out,
            "data.seq_len (32)", "context of 16", "model.context_length")


def test_seq_len_longer_than_the_hf_config_context_is_refused(ryzen, tmp_path):
    config_file = tmp_path / "llama.json"
    config_file.write_text(json.dumps(tiny_llama_config(vocab_size=300, max_positions=16)))
    out = tmp_path / "run"
    refused(ryzen("train", *tiny_sets("model.source=hf", f"model.hf_config={config_file}"), "--out", str(out)),
            out, "data.seq_len (32)", "context of 16", "max_position_embeddings")


def test_saved_hf_model_with_a_larger_tokenizer_than_its_vocabulary_is_refused(ryzen, tmp_path):
    model_dir = tmp_path / "hf"
    save_hf_model(hf_model_from_config(tiny_llama_config(vocab_size=50)), model_dir)
    words = {f"w{i}": i for i in range(99)} | {"<|endoftext|>": 99}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<|endoftext|>"))
    Tokenizer(backend).save(model_dir)
    out = tmp_path / "run"
    refused(ryzen("train", *tiny_sets("model.source=hf", f"model.hf_path={model_dir}"), "--out", str(out)), out,
            "has 100 tokens", "vocab_size is 50")
