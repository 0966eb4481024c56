"""Language models: the built-in Transformer, offline Hugging Face causal LMs, and a
KV-cache generation loop that serves both. Importing this package does not import
transformers."""

from ryzen_core.models.generate import (
    decode_loop,
    filter_logits,
    generate,
    generate_no_cache,
    hf_forward_with_cache,
    is_hf_model,
    last_hidden,
    lm_logits,
    model_outputs,
    sample_next,
)
from ryzen_core.models.hf import hf_model_from_config, load_hf_model, save_hf_model, tiny_llama_config
from ryzen_core.models.transformer import MLP, PRESETS, ModelOutput, Transformer, TransformerConfig

__all__ = [
    "MLP",
    "PRESETS",
    "ModelOutput",
    "Transformer",
    "TransformerConfig",
    "filter_logits",
    "decode_loop",
    "generate",
    "generate_no_cache",
    "hf_forward_with_cache",
    "hf_model_from_config",
    "is_hf_model",
    "last_hidden",
    "lm_logits",
    "load_hf_model",
    "model_outputs",
    "sample_next",
    "save_hf_model",
    "tiny_llama_config",
]
