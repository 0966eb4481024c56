"""Speculative decoding with the target's KV cache: draft k tokens, score them all in one forward of the
target over [last token, d_1 .. d_k], keep the accepted prefix plus one token of the target's own, and
crop the cache back to what was kept.

The cache always holds every token of the sequence but the last, which is the next forward's first
input; a step without a draft is exactly a step of plain decoding (`ryzen_core.generate`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ryzen_core import is_hf_model, model_outputs, sample_next

from . import acceptance
from .adaptive import DraftLength
from .drafters import PromptLookupDrafter
from .kv_cache import crop_cache


@dataclass
class SpeculationStats:
    """Counts over one or more generations. Tokens count positions (a batch of B rows emitting one token
    each is one token), as target forwards do."""

    calls: int = 0
    tokens: int = 0
    target_forwards: int = 0  # the prefill included
    verifications: int = 0  # forwards that scored at least one drafted token
    drafted: int = 0
    accepted: int = 0
    pauses: int = 0  # times the adaptive rule stopped drafting for a while
    draft_forwards: int = 0  # forwards of a draft model (0 for prompt lookup)

    def add(self, other: "SpeculationStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self),
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "mean_accepted_length": self.accepted / self.verifications if self.verifications else None,
                "target_forwards_per_token": self.target_forwards / self.tokens if self.tokens else None}


class _Output:
    """The growing sequence; applies eos like the plain loop (a finished row is padded with eos) and
    calls on_token for every emitted token."""

    def __init__(self, input_ids, max_new_tokens, eos_token_id, on_token):
        self.sequence, self.max_new_tokens = input_ids, max_new_tokens
        self.eos_token_id, self.on_token = eos_token_id, on_token
        self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.produced, self.done = 0, max_new_tokens == 0

    def emit_one(self, token: torch.Tensor) -> None:
        """Append one token per row [B]: `emit` for a step without drafts, in as few tensor operations as
        the plain loop (at about a millisecond a step, each one shows)."""
        token = token.to(self.sequence.dtype)
        if self.eos_token_id is not None:
            token = token.masked_fill(self.finished, self.eos_token_id)
            self.finished |= token == self.eos_token_id
        self.sequence = torch.cat([self.sequence, token.unsqueeze(1)], dim=1)
        if self.on_token is not None:
            self.on_token(self.produced)
        self.produced += 1
        if self.produced >= self.max_new_tokens or (self.eos_token_id is not None and bool(self.finished.all())):
            self.done = True

    def emit(self, tokens: torch.Tensor) -> None:
        """Append tokens [B, m], one position at a time, stopping at the budget or when every row ended."""
        for column in tokens.unbind(dim=1):
            self.emit_one(column)
            if self.done:
                return


def _check_arguments(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    limit = None if is_hf_model(model) else getattr(config, "context_length", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context_length {limit}")


def speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         eos_token_id: int | None = None, generator: torch.Generator | None = None,
                         on_token: Callable[[int], None] | None = None, drafter: Any = None,
                         draft_length: DraftLength | None = None,
                         stats: SpeculationStats | None = None) -> torch.Tensor:
    """`ryzen_core.generate`'s contract and output (greedy: the same tokens; sampling: the same
    distribution), drafting with `drafter` (default prompt lookup) as `draft_length` says (a schedule may
    serve several generations: adaptive.py). Counts go into `stats` when given."""
    _check_arguments(model, input_ids, max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    drafter = drafter or PromptLookupDrafter()
    draft_length = draft_length or DraftLength(8)
    counts = SpeculationStats(calls=1)
    sampling = None if temperature == 0 else (temperature, top_k, top_p, generator)
    draft_forwards_before, pauses_before = getattr(drafter, "forwards", 0), _pauses(drafter, draft_length)
    was_training = model.training
    model.eval()  # dropout must be off while generating
    try:
        with torch.inference_mode():
            output = _Output(input_ids, max_new_tokens, eos_token_id, on_token)
            _decode(model, output, sampling, drafter, draft_length, counts)
    finally:
        model.train(was_training)
        counts.pauses = _pauses(drafter, draft_length) - pauses_before  # a schedule may outlive the generation
        counts.draft_forwards = getattr(drafter, "forwards", 0) - draft_forwards_before
        if stats is not None:
            stats.add(counts)
    return output.sequence


def _pauses(drafter, draft_length: DraftLength) -> int:
    """Pauses so far of the loop's schedule and of the drafter's own (drafter: auto's draft model)."""
    own = getattr(drafter, "model_schedule", None)
    return draft_length.pauses + (own.pauses if own is not None else 0)


def _verify(logits, drafts, draft_probs, sampling) -> tuple[int, torch.Tensor]:
    if sampling is None:
        return acceptance.verify_greedy(logits, drafts)
    return acceptance.verify_sampled(logits, drafts, draft_probs, *sampling)


def _decode(model, output: _Output, sampling, drafter, draft_length: DraftLength, counts: SpeculationStats) -> None:
    if output.done:
        return
    logits, cache = model_outputs(model, output.sequence)
    output.emit_one(_next_token(logits, sampling))
    counts.target_forwards, counts.tokens = 1, 1
    while not output.done:
        length = min(draft_length.next(), output.max_new_tokens - output.produced - 1)
        before = output.produced
        if length <= 0:
            cache = _plain_step(model, output, cache, sampling)
        else:
            cache = _drafting_step(model, output, cache, sampling, drafter, length, draft_length, counts)
        counts.target_forwards += 1
        counts.tokens += output.produced - before


def _next_token(logits: torch.Tensor, sampling) -> torch.Tensor:
    """The token [B] plain decoding picks after the last position of `logits` [B, T, V]."""
    return logits[:, -1].argmax(dim=-1) if sampling is None else sample_next(logits[:, -1], *sampling)


def _plain_step(model, output: _Output, cache, sampling):
    """One token by one target forward: plain decoding's step (`ryzen_core.generate`'s, op for op)."""
    logits, cache = model_outputs(model, output.sequence[:, -1:], cache)
    output.emit_one(_next_token(logits, sampling))
    return cache


def _drafting_step(model, output: _Output, cache, sampling, drafter, length: int, draft_length: DraftLength,
                   counts: SpeculationStats):
    """Draft up to `length` tokens, verify them in one target forward, keep the accepted ones and one of the
    target's; a drafter that proposes nothing makes it a plain step."""
    forwards_before = getattr(drafter, "forwards", 0)
    drafts, draft_probs = drafter.propose(output.sequence, length, sampling)
    k = drafts.shape[1]
    if k == 0:
        return _plain_step(model, output, cache, sampling)
    kept_length = output.sequence.shape[1]  # the cache holds kept_length - 1 positions now
    step_input = torch.cat([output.sequence[:, -1:], drafts.to(output.sequence.dtype)], dim=1)
    logits, cache = model_outputs(model, step_input, cache)
    n, next_tokens = _verify(logits, drafts, draft_probs, sampling)
    cache = crop_cache(cache, kept_length + n)  # drop the rejected drafts' keys and values
    counts.verifications, counts.drafted, counts.accepted = \
        counts.verifications + 1, counts.drafted + k, counts.accepted + n
    draft_forwards = getattr(drafter, "forwards", 0) - forwards_before
    # drafter: auto keeps the draft model's steps to the draft model's own schedule
    if not (hasattr(drafter, "verified") and drafter.verified(k, n, draft_forwards)):
        draft_length.update(k, n, draft_forwards)
    output.emit(torch.cat([drafts[:, :n], next_tokens.unsqueeze(1)], dim=1))
    return cache
