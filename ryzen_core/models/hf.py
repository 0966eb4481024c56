"""Hugging Face causal LMs, offline only.

`transformers` is imported inside each function: importing it costs seconds, and the
built-in model path must not pay for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def load_hf_model(path: str | os.PathLike) -> "PreTrainedModel":
    """Load a causal LM from a local `save_pretrained` directory (never touches the hub)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} is not a Hugging Face model directory: no config.json found "
            f"(expected the output of save_pretrained)"
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model.eval()


def hf_config(
    config_json_path_or_dict: str | os.PathLike | dict[str, Any],
    vocab_size: int | None = None,
) -> "PretrainedConfig":
    """The transformers config a causal LM is built from.

    Accepts a dict with a `model_type` key (e.g. from `tiny_llama_config`), a path to a
    config JSON file, or a directory containing config.json.
    """
    if isinstance(config_json_path_or_dict, dict):
        config_dict = dict(config_json_path_or_dict)
    else:
        config_path = Path(config_json_path_or_dict)
        if config_path.is_dir():
            config_path = config_path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"config file not found: {config_path}")
        config_dict = json.loads(config_path.read_text())

    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise ValueError("transformers config needs a 'model_type' (e.g. 'llama')")
    if vocab_size is not None:
        config_dict["vocab_size"] = vocab_size
    # Keys that describe a saved checkpoint rather than the architecture.
    for key in ("architectures", "transformers_version", "_name_or_path"):
        config_dict.pop(key, None)

    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **config_dict)


def hf_model_from_config(
    config_json_path_or_dict: str | os.PathLike | dict[str, Any],
    vocab_size: int | None = None,
) -> "PreTrainedModel":
    """Build a randomly initialised causal LM from a transformers config (see `hf_config`).
    Seed torch beforehand for a reproducible init."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(config_json_path_or_dict, vocab_size))


SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def overrides_to_fit(config: "PretrainedConfig", wanted: dict[str, Any]) -> dict[str, list[Any]]:
    """The values of a transformers config (its defaults included, e.g. Llama's bos=1, eos=2) that
    differ from what the tokenizer needs: {key: [given, used]}."""
    return {key: [getattr(config, key, None), value] for key, value in wanted.items()
            if getattr(config, key, None) != value}


def set_special_token_ids(model: "PreTrainedModel", ids: dict[str, int | None]) -> None:
    """Make the model's config and generation config name the tokenizer's special tokens, so a plain
    `generate()` on the saved model stops at the tokenizer's end of text."""
    for key in SPECIAL_TOKEN_KEYS:
        setattr(model.config, key, ids.get(key))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, ids.get(key))


def save_hf_model(model: "PreTrainedModel", out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """save_pretrained into `out_dir` (transformers 5 always writes safetensors).

    `tokenizer` may be a transformers tokenizer (anything with `save_pretrained`) or a
    `tokenizers.Tokenizer` (anything with `save(path)`, written as tokenizer.json).
    """
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out_path)
        elif hasattr(tokenizer, "save"):
            tokenizer.save(str(out_path / "tokenizer.json"))
        else:
            raise TypeError(
                f"cannot save tokenizer of type {type(tokenizer).__name__}: "
                "it has neither save_pretrained nor save"
            )
    return out_path


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 128,
) -> dict[str, Any]:
    """A small llama config dict for tests and examples (use with hf_model_from_config)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        # Llama's defaults (bos=1, eos=2) would claim ids the project's tokenizer may use
        # for other tokens; leave special ids to the tokenizer.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
