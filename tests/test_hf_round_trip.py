"""The HF round trip: what Ryzen changes in a user's transformers config is said and kept, and the saved
`hf_model` works with plain transformers (its special token ids are the saved tokenizer's)."""
from __future__ import annotations

import json

import torch

from helpers import tiny_sets
from ryzen_core.models import tiny_llama_config


def test_overrides_are_logged_and_kept_and_plain_transformers_generate_stops_at_end_of_text(ryzen, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    user_config = tiny_llama_config(vocab_size=32000, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                                    max_positions=64)
    user_config.update(bos_token_id=1, eos_token_id=2)  # Llama's own ids, as a downloaded config has them
    config_file = tmp_path / "llama.json"
    config_file.write_text(json.dumps(user_config))
    out = tmp_path / "run"
    result = ryzen("train", *tiny_sets("model.source=hf", f"model.hf_config={config_file}"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    saved = out / "hf_model"
    tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    assert eos is not None and eos != 2
    assert f"vocab_size 32000 is replaced by {vocab}" in result.stderr
    assert json.loads((out / "config.json").read_text())["model"]["hf_overrides"] == {
        "vocab_size": [32000, vocab], "bos_token_id": [1, None], "eos_token_id": [2, eos]}
    generation_file = json.loads((saved / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == getattr(tokenizer, key), key
        assert generation_file.get(key) == getattr(tokenizer, key), key

    prompt = tokenizer("def main(", return_tensors="pt").input_ids

    class EndOfTextThird(LogitsProcessor):
        """The model says end-of-text as its third token: generate() must stop right there."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores = torch.full_like(scores, -torch.inf)
                scores[:, eos] = 0.0
            return scores

    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=20, do_sample=False,
                                logits_processor=LogitsProcessorList([EndOfTextThird()]))
    assert output.shape[1] == prompt.shape[1] + 3
    assert tokenizer.decode(output[0]).endswith(tokenizer.eos_token)
