"""Build the model a config asks for: the built-in transformer or a Hugging Face causal LM."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from .hf import hf_model_from_config, load_hf_model
from .transformer import PRESETS, Transformer, TransformerConfig

if TYPE_CHECKING:  # config imports this module to check sizes
    from ..config import ModelConfig

SIZE_FIELDS = ("d_model", "n_heads", "n_layers", "d_ff", "context_length")


def builtin_config(cfg: ModelConfig, vocab_size: int) -> TransformerConfig:
    sizes = dict(PRESETS[cfg.preset], vocab_size=vocab_size, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings)
    sizes.update({f: getattr(cfg, f) for f in SIZE_FIELDS if getattr(cfg, f) is not None})
    if sizes["d_model"] % sizes["n_heads"]:
        from ..errors import ConfigError

        raise ConfigError(f"config error: model.d_model ({sizes['d_model']}) must be divisible by model.n_heads ({sizes['n_heads']})")
    return TransformerConfig(**sizes)


def build_model(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """A fresh model (or the saved HF model at cfg.hf_path) sized for `vocab_size` tokens."""
    if cfg.source == "builtin":
        return Transformer(builtin_config(cfg, vocab_size))
    if cfg.hf_path is not None:
        return load_hf_model(cfg.hf_path)
    return hf_model_from_config(json.loads(cfg.hf_config.read_text()), vocab_size=vocab_size)


def context_length(model: torch.nn.Module) -> int:
    """Longest sequence the model accepts."""
    if isinstance(model, Transformer):
        return model.config.context_length
    return int(getattr(model.config, "max_position_embeddings", 2048))
