"""The trained model a run directory holds, loaded for use after training (`ryzen generate --run`).

A run directory of `ryzen train` holds one model; one of `ryzen run` holds one per variant
(`baseline/`, `optimized/`, ...). A model is its `hf_model/` (Hugging Face models) or its newest
checkpoint, built from the run's config; both hold the same final weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CONFIG_FILE, latest_checkpoint, load_weights
from .errors import CheckpointError, ConfigError

HF_MODEL_DIR = "hf_model"


def _is_hf_model_dir(path: Path) -> bool:
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def holds_model(path: Path) -> bool:
    return _is_hf_model_dir(path / HF_MODEL_DIR) or latest_checkpoint(path) is not None


def trained_model_dirs(path: Path) -> list[Path]:
    """`path` itself if it holds a model, else the directories right under it that do."""
    if holds_model(path):
        return [path]
    return [d for d in sorted(path.iterdir()) if d.is_dir() and holds_model(d)] if path.is_dir() else []


def load_trained_model(path: str | Path) -> tuple[torch.nn.Module, object, Path]:
    """(model in eval mode, tokenizer, what was loaded) from a run directory, one variant's directory or
    an `hf_model/` directory. A run with several models is refused with their names."""
    from .data import Tokenizer
    from .models import load_hf_model

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    if _is_hf_model_dir(path):
        return load_hf_model(path), Tokenizer.load(path), path
    found = trained_model_dirs(path)
    if not found:
        raise CheckpointError(f"{path} holds no trained model (no {HF_MODEL_DIR}/ or training_checkpoint/LATEST "
                              "in it or in a directory right under it)")
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} models; choose one: {', '.join(str(d) for d in found)}")
    variant = found[0]
    if _is_hf_model_dir(variant / HF_MODEL_DIR):
        return load_hf_model(variant / HF_MODEL_DIR), Tokenizer.load(variant / HF_MODEL_DIR), variant / HF_MODEL_DIR
    return _from_checkpoint(variant)


def _from_checkpoint(variant: Path) -> tuple[torch.nn.Module, object, Path]:
    from .config import load_config
    from .data import Tokenizer
    from .models.build import build_model

    config_file = next((d / CONFIG_FILE for d in (variant, variant.parent) if (d / CONFIG_FILE).is_file()), None)
    tokenizer_dir = next((d / "tokenizer" for d in (variant, variant.parent) if (d / "tokenizer").is_dir()), None)
    if config_file is None or tokenizer_dir is None:
        raise CheckpointError(f"{variant} has a checkpoint but no {CONFIG_FILE} or tokenizer/ to rebuild the model from")
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = build_model(load_config(config_file).model, tokenizer.vocab_size)
    checkpoint = latest_checkpoint(variant)
    load_weights(model, checkpoint)
    return model.eval(), tokenizer, checkpoint
