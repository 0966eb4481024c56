"""Autoregressive generation with a KV cache, shared by the built-in Transformer and
Hugging Face causal LMs."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

from ryzen_core.models.transformer import Transformer


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; detect the kind on the original, call the wrapper.
    return getattr(model, "_orig_mod", model)


def is_hf_model(model: Any) -> bool:
    # A transformers model cannot exist unless transformers was imported, so checking
    # sys.modules avoids paying for the import on the built-in path.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(_unwrap(model), transformers.PreTrainedModel)


def _is_builtin(model: Any) -> bool:
    return isinstance(_unwrap(model), Transformer)


def _unsupported(model: Any) -> TypeError:
    return TypeError(
        f"unsupported model type {type(model).__name__}: expected ryzen_core Transformer "
        "or a transformers PreTrainedModel"
    )


@functools.lru_cache(maxsize=None)
def _hf_cache_name(model_type: type) -> str:
    # transformers 5 renamed forward's `past_key_values` to `cache`: the old name warns and goes in 5.40.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def hf_forward_with_cache(model: nn.Module, cache: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """A transformers causal LM's cached forward under whichever name its version gives the
    cache argument: (logits, the cache to pass next)."""
    output = model(**inputs, **{_hf_cache_name(type(_unwrap(model))): cache}, use_cache=True)
    return output.logits, (output.cache if hasattr(output, "cache") else output.past_key_values)


def model_outputs(model: nn.Module, input_ids: torch.Tensor, past_key_values: Any = None) -> tuple[torch.Tensor, Any]:
    """One cached forward step: returns (logits [B, T, V], cache to pass to the next step).

    The built-in cache is a list of (k, v) per layer. For HF models it is the transformers
    Cache object, which is updated in place: do not reuse an old cache after stepping it.
    """
    if _is_builtin(model):
        output = model(input_ids, past_key_values=past_key_values, use_cache=True)
        return output.logits, output.past_key_values
    if is_hf_model(model):
        return hf_forward_with_cache(model, past_key_values, input_ids=input_ids)
    raise _unsupported(model)


def lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T, V] without a cache."""
    if _is_builtin(model):
        return model(input_ids).logits
    if is_hf_model(model):
        return model(input_ids=input_ids, use_cache=False).logits
    raise _unsupported(model)


def last_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden state [B, T, d] (after the last norm, before the LM head)."""
    if _is_builtin(model):
        return model(input_ids).hidden
    if is_hf_model(model):
        output = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        return output.hidden_states[-1]
    raise _unsupported(model)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, V] divided by `temperature` (> 0), with tokens outside the top_k best and
    outside the top_p nucleus set to -inf: the distribution every sampler here draws from."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth_best = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best
        # token is therefore always kept.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_indices, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits [B, V]; returns LongTensor [B].

    temperature 0 is greedy argmax. Otherwise logits are divided by the temperature,
    restricted to the top_k best (0 = off) and then to the smallest set whose probability
    mass reaches top_p (1.0 = off), and sampled with `generator`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_generation_args(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if _is_builtin(model):
        context_length = _unwrap(model).config.context_length
        total = input_ids.shape[1] + max_new_tokens
        if total > context_length:
            raise ValueError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                f"exceeds the model's context_length {context_length}"
            )


def _decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    next_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_id: int | None,
    generator: torch.Generator | None,
    on_token: Callable[[int], None] | None,
) -> torch.Tensor:
    """Shared sampling loop. `next_logits(sequence, new_token)` returns [B, V] logits for
    the position after `sequence`; new_token is None on the first (prefill) call."""
    _check_generation_args(model, input_ids, max_new_tokens)
    was_training = model.training
    model.eval()  # dropout must be off while generating
    try:
        with torch.inference_mode():
            sequence = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            new_token = None
            for step in range(max_new_tokens):
                logits = next_logits(sequence, new_token)
                new_token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    new_token = new_token.masked_fill(finished, eos_token_id)
                    finished |= new_token == eos_token_id
                sequence = torch.cat([sequence, new_token.unsqueeze(1).to(sequence.dtype)], dim=1)
                if on_token is not None:
                    on_token(step)
                if eos_token_id is not None and bool(finished.all()):
                    break
            return sequence
    finally:
        model.train(was_training)


def decode_loop(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                next_logits: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                generator: torch.Generator | None = None, on_token: Callable[[int], None] | None = None) -> torch.Tensor:
    """`generate`'s sampling loop (prefill, one token per step, eos padding, `on_token(step)`) around a
    plugin's own `next_logits(sequence, new_token)` -> [B, V], for plugins that keep their own KV cache."""
    return _decode(model, input_ids, max_new_tokens, next_logits, temperature, top_k, top_p, eos_token_id,
                   generator, on_token)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate with a KV cache: one prefill over the prompt, then one token per step.

    Returns [B, T + produced]; produced < max_new_tokens only when every row hit
    eos_token_id (rows that finish earlier are padded with eos). `on_token(step)` runs
    after each token, step 0 being the token produced by the prefill.
    """
    cache: list[Any] = [None]

    def next_logits(sequence: torch.Tensor, new_token: torch.Tensor | None) -> torch.Tensor:
        step_input = sequence if new_token is None else new_token.unsqueeze(1).to(sequence.dtype)
        logits, cache[0] = model_outputs(model, step_input, cache[0])
        return logits[:, -1, :]

    return _decode(
        model, input_ids, max_new_tokens, next_logits,
        temperature, top_k, top_p, eos_token_id, generator, on_token,
    )


def generate_no_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Reference generation that recomputes the whole sequence each step (quadratic);
    the KV-cache path in `generate` must match it token for token."""

    def next_logits(sequence: torch.Tensor, new_token: torch.Tensor | None) -> torch.Tensor:
        return lm_logits(model, sequence)[:, -1, :]

    return _decode(
        model, input_ids, max_new_tokens, next_logits,
        temperature, top_k, top_p, eos_token_id, generator, on_token,
    )
