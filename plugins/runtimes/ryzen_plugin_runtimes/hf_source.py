"""The Hugging Face directory every engine converts from.

The built-in `Transformer` is GPT-2 in all but names: pre-LayerNorm (no bias, eps 1e-5),
learned positions, one fused qkv projection, an exact-erf GELU MLP and (usually) tied
embeddings. So it is written as a `GPT2LMHeadModel` with zero biases, which CTranslate2
and llama.cpp both know. A Llama-architecture HF model is saved as it is.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ryzen_core import Transformer, is_hf_model, save_hf_model

from .manifest import EngineSkipped

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the built-in model uses


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def builtin_blocker(model: Transformer) -> str | None:
    """Why this built-in model is not a plain GPT-2 (a plugin swapped a module), or None."""
    for index, block in enumerate(model.blocks):
        activation = block.mlp.activation
        if type(activation) is not nn.GELU or activation.approximate != "none":
            return f"block {index} MLP activation is {activation!r}, not the exact GELU GPT-2 has"
        norms = (block.norm_attn, block.norm_mlp)
        if any(type(n) is not nn.LayerNorm or n.eps != LAYER_NORM_EPS or n.bias is not None for n in norms):
            return f"block {index} has a norm other than the model's bias-free LayerNorm(eps=1e-5)"
        linears = (block.attn.qkv, block.attn.proj, block.mlp.up, block.mlp.down)
        if any(type(linear) is not nn.Linear for linear in linears):
            return f"block {index} has a replaced linear layer (quantized or wrapped)"
    return None


def gpt2_from_builtin(model: Transformer):
    """A `GPT2LMHeadModel` computing the same logits as `model` (float32, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = unwrap(model)
    reason = builtin_blocker(model)
    if reason:
        raise EngineSkipped(f"the model is not plain GPT-2-shaped: {reason}")
    cfg = model.config
    gpt2_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu", layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    gpt2 = GPT2LMHeadModel(gpt2_config).eval()
    gpt2.load_state_dict(gpt2_state_dict(model, gpt2.state_dict()), strict=True)
    return gpt2


def gpt2_state_dict(model: Transformer, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names; HF's Conv1D stores [in, out], the transpose of nn.Linear's weight."""
    state = {name: torch.zeros_like(tensor) for name, tensor in template.items()}  # every bias stays zero

    def put(name: str, value: torch.Tensor) -> None:
        if state[name].shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit GPT-2's {tuple(state[name].shape)}")
        state[name] = value.detach().float().clone()

    put("transformer.wte.weight", model.tok_emb.weight)
    put("transformer.wpe.weight", model.pos_emb.weight)
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        put(prefix + "ln_1.weight", block.norm_attn.weight)
        put(prefix + "attn.c_attn.weight", block.attn.qkv.weight.T)
        put(prefix + "attn.c_proj.weight", block.attn.proj.weight.T)
        put(prefix + "ln_2.weight", block.norm_mlp.weight)
        put(prefix + "mlp.c_fc.weight", block.mlp.up.weight.T)
        put(prefix + "mlp.c_proj.weight", block.mlp.down.weight.T)
    put("transformer.ln_f.weight", model.norm_final.weight)
    put("lm_head.weight", model.lm_head.weight)
    for name in [n for n in state if n.endswith(".attn.bias") or n.endswith(".attn.masked_bias")]:
        state[name] = template[name]  # causal-mask buffers of older transformers versions, not weights
    return state


def hf_architecture(model: nn.Module) -> str:
    """'gpt2' for the built-in model, else the HF config's model_type ('llama', ...)."""
    model = unwrap(model)
    if isinstance(model, Transformer):
        return "gpt2"
    if is_hf_model(model):
        return str(model.config.model_type)
    raise EngineSkipped(f"unsupported model type {type(model).__name__}")


def write_hf_source(model: nn.Module, tokenizer: Any, directory: Path) -> Path:
    """save_pretrained (float32) of the model as an HF causal LM plus our tokenizer, in `directory`."""
    model = unwrap(model)
    hf_model = gpt2_from_builtin(model) if isinstance(model, Transformer) else model
    if not is_hf_model(hf_model):
        raise EngineSkipped(f"unsupported model type {type(model).__name__}")
    if any(p.dtype != torch.float32 for p in hf_model.parameters()):
        hf_model = copy.deepcopy(hf_model).float()  # the converters read float32; the run's model stays as it is
    save_hf_model(hf_model, directory)
    tokenizer.save(directory)
    # GPT-2's convention: one end-of-text token is also bos and unk. Converters copy these
    # names into their configs (CTranslate2 refuses a null one); we never prepend bos.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("bos_token", tokenizer.eos_token)
    config.setdefault("unk_token", tokenizer.eos_token)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory
