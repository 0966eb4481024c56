"""A lean decode step for the ternary HF Llama: the same arithmetic as transformers' eager LlamaForCausalLM, in
about a third of the Python operations.

At 100M parameters the ternary layers take about 40 us each, and transformers' module tree (cache objects,
masks, hooks, repeat_kv, output classes) spent about as long again per layer in Python, about 2 ms per token.
This step calls the model's own modules and weights (TernaryLinear, the RMSNorm weights, the rotary
embedding's cos/sin for every position, computed once by the model's own rotary module) on a preallocated KV
cache: per layer one fused norm, the seven ternary layers, rotary, an in-place cache write, one
scaled_dot_product_attention with grouped KV heads, SiLU-gating and two residual adds.

Built only for the model it matches (`decoder_for`): a LlamaForCausalLM with the default rotary embedding, no
attention or MLP bias, SiLU, every projection a TernaryLinear; otherwise None and Ryzen's generic loop runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ryzen_core import decode_loop

from .kernel import TernaryLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _blocker(model) -> str | None:
    """Why `model` is not a ternary Llama this decoder reproduces, or None."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or config is None:
        return "not a LlamaForCausalLM"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return f"rope type {rope.get('rope_type') or rope.get('type')}"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_bias", False) or \
            getattr(config, "mlp_bias", False):
        return "activation or biases other than Llama's defaults"
    for layer in model.model.layers:
        if not all(isinstance(layer.get_submodule(p), TernaryLinear) for p in PROJECTIONS):
            return "a projection that is not a TernaryLinear"
    return None


class TernaryLlamaDecoder:
    """`generate(input_ids, max_new_tokens, **sampling)` for a ternary LlamaForCausalLM (see the module doc)."""

    def __init__(self, model):
        self.model, config = model, model.config
        self.layers = list(model.model.layers)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps, self.positions = config.rms_norm_eps, config.max_position_embeddings
        probe = torch.zeros(1, 1, self.head_dim)
        cos, sin = model.model.rotary_emb(probe, torch.arange(self.positions).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim], the model's own values
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = 0

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _reserve(self, batch: int, tokens: int, like: torch.Tensor) -> None:
        """Room for `tokens` positions in every layer's cache, grown by doubling (copying what it holds)."""
        if self.cache and self.cache[0][0].shape[0] == batch and self.cache[0][0].shape[2] >= tokens:
            return
        capacity = min(self.positions, max(tokens, 2 * (self.cache[0][0].shape[2] if self.cache else 128)))
        grown = []
        for index in range(len(self.layers)):
            k, v = (like.new_zeros(batch, self.kv_heads, capacity, self.head_dim) for _ in range(2))
            if self.cache and self.cache[0][0].shape[0] == batch:
                k[:, :, :self.length], v[:, :, :self.length] = (t[:, :, :self.length] for t in self.cache[index])
            grown.append((k, v))
        self.cache = grown

    def _attention(self, layer, index: int, x: torch.Tensor, start: int) -> torch.Tensor:
        batch, tokens, _ = x.shape
        attn = layer.self_attn
        h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, self.eps)
        q = attn.q_proj(h).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[start:start + tokens], self.sin[start:start + tokens]
        keys, values = self.cache[index]
        keys[:, :, start:start + tokens] = self._rotate(k, cos, sin)
        values[:, :, start:start + tokens] = v
        end = start + tokens
        mask = None
        if tokens > 1 and start > 0:  # new tokens after cached ones: each sees the cache and its own prefix
            mask = torch.ones(tokens, end, dtype=torch.bool).tril(start)
        out = F.scaled_dot_product_attention(self._rotate(q, cos, sin), keys[:, :, :end], values[:, :, :end],
                                             attn_mask=mask, is_causal=tokens > 1 and start == 0, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [B, T, V] of `input_ids` [B, T] at positions start.., the cache holding positions < start."""
        x = self.model.model.embed_tokens(input_ids)
        self._reserve(input_ids.shape[0], start + input_ids.shape[1], x)
        for index, layer in enumerate(self.layers):
            x = x + self._attention(layer, index, x, start)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        self.length = start + input_ids.shape[1]
        x = F.rms_norm(x, x.shape[-1:], self.model.model.norm.weight, self.eps)
        return self.model.lm_head(x)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        if input_ids.shape[1] + max_new_tokens > self.positions:
            raise ValueError(f"{input_ids.shape[1]} + {max_new_tokens} tokens exceed the model's "
                             f"{self.positions} positions")

        def next_logits(sequence: torch.Tensor, new_token: torch.Tensor | None) -> torch.Tensor:
            if new_token is None:  # the prompt: a fresh cache
                self.length = 0
                return self.forward(sequence, 0)[:, -1]
            return self.forward(new_token.unsqueeze(1).to(sequence.dtype), self.length)[:, -1]

        return decode_loop(self.model, input_ids, max_new_tokens, next_logits, **sampling)


def decoder_for(model) -> tuple[TernaryLlamaDecoder | None, str | None]:
    """(the lean decoder, None) for a ternary Llama it reproduces, else (None, why not)."""
    reason = _blocker(model)
    return (None, reason) if reason else (TernaryLlamaDecoder(model), None)
