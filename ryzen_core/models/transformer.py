"""Built-in decoder-only transformer (nanoGPT style), sized for CPU training.

Design choices:
- Pre-norm blocks with LayerNorm (no bias). RMSNorm would save a little compute, but
  LayerNorm lowers to a single ONNX `LayerNormalization` op (opset 17) that every
  CPU runtime fuses, so the exported graph stays simple and fast.
- Learned absolute position embeddings: a plain embedding lookup exports to ONNX
  without the sin/cos plumbing RoPE needs.
- Attention goes through `F.scaled_dot_product_attention`, which picks a fused CPU
  kernel and exports cleanly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    context_length: int
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# vocab_size here is only a default: callers override it with their tokenizer's size.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, d_model=32, n_heads=2, n_layers=2, d_ff=64, context_length=64),
    "simple": dict(vocab_size=2048, d_model=256, n_heads=4, n_layers=2, d_ff=512, context_length=128),
    "scaled": dict(vocab_size=2048, d_model=512, n_heads=8, n_layers=4, d_ff=1024, context_length=128),
}


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, d_model], after the final norm, before the LM head
    past_key_values: KVCache | None  # per layer (k, v), each [B, n_heads, T_total, head_dim]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, new_len, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=2)
        q, k, v = (t.view(batch, new_len, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

        past_len = 0
        if past is not None:
            past_len = past[0].shape[2]
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)

        dropout_p = self.dropout if self.training else 0.0
        if past_len == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif new_len == 1:
            # A single new token may see every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # is_causal aligns the mask top-left, which is wrong when q is shorter than k;
            # query i sits at absolute position past_len + i and may see keys 0..past_len + i.
            mask = torch.ones(new_len, past_len + new_len, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=past_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

        y = y.transpose(1, 2).reshape(batch, new_len, d_model)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    """GELU feed-forward. `activation` is a swappable module so plugins (e.g. top-k
    activation sparsity) can wrap the hidden activation without touching `up`/`down`."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.activation: nn.Module = nn.GELU()
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.up(x))))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, present = self.attn(self.norm_attn(x), past)
        x = x + attn_out
        x = x + self.mlp(self.norm_mlp(x))
        return x, present


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_final = nn.LayerNorm(config.d_model, bias=False)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init; the projections that write into the residual stream are scaled down
        # so the residual variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        new_len = input_ids.shape[1]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError(
                f"past_key_values has {len(past_key_values)} layers, model has {self.config.n_layers}"
            )
        if past_len + new_len > self.config.context_length:
            raise ValueError(
                f"sequence length {past_len + new_len} (past {past_len} + new {new_len}) exceeds "
                f"context_length {self.config.context_length}"
            )

        positions = torch.arange(past_len, past_len + new_len, device=input_ids.device)
        x = self.emb_dropout(self.tok_emb(input_ids) + self.pos_emb(positions))

        presents: KVCache = []
        for layer_index, block in enumerate(self.blocks):
            layer_past = None if past_key_values is None else past_key_values[layer_index]
            x, present = block(x, layer_past)
            if use_cache:  # holding presents otherwise keeps every layer's qkv output alive until backward
                presents.append(present)

        hidden = self.norm_final(x)
        logits = self.lm_head(hidden)
        return ModelOutput(logits, hidden, presents if use_cache else None)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameter count (tied weights counted once). `non_embedding` drops the
        token/position embeddings and the LM head, following Kaplan et al. (2020)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), Kaplan/PaLM estimate plus the LM head:

            6 * (N_nonembedding + vocab * d_model) + 12 * n_layers * d_model * context_length

        6N: each weight in a matmul costs a multiply-add (2 FLOPs) forward and twice that
        backward. The LM head is a real matmul whether or not it is tied; for small-vocab
        models leaving it out (as Kaplan does) would understate the work by a third. The
        last term is the QK^T and attention-times-V matmuls over a full context.
        Embedding lookups are free.
        """
        cfg = self.config
        matmul_params = self.num_parameters(non_embedding=True) + cfg.vocab_size * cfg.d_model
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * cfg.context_length
