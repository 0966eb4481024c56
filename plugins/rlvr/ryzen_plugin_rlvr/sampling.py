"""Multi-path generation: N sampled paths per prompt in one batch, sharing one prefill through the KV cache.

Each path draws its randomness from its own `torch.Generator` (seeded per path), through the Gumbel-max
trick: token = argmax(filtered logits / T + Gumbel noise). A path's tokens therefore depend only on its
prompt and its seed, never on which other paths share the batch: path k of a 16-path run is the same
path as path k of an 8-path run, and the same as when generated alone.

Task text is encoded one character at a time (`TaskCodec`), so numbers never meet a BPE merge:
"579" is always the three tokens 5, 7, 9 whatever the tokenizer learned from its corpus.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ryzen_core import filter_logits, is_hf_model, model_outputs


def path_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one path from a base seed and its coordinates (prompt index, path index, ...)."""
    digest = hashlib.sha256(":".join(str(k) for k in (seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class TaskCodec:
    """Task text <-> token ids, one character at a time; a prompt starts with end-of-text as its BOS."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_id
        self._char_ids: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            if ch not in self._char_ids:
                self._char_ids[ch] = list(self.tokenizer.encode(ch))
            ids += self._char_ids[ch]
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.eos_id, *self.encode(prompt)]

    def completion_ids(self, completion: str) -> list[int]:
        return [*self.encode(completion), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids up to (not including) the first end-of-text."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids)


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator] | None,
                top_k: int = 0) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax when temperature is 0, else Gumbel-max with row i's noise
    drawn from generators[i] (one uniform per vocabulary entry per step)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one generator per row")
    scaled = filter_logits(logits, temperature, top_k, top_p)
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(scaled.device)
    gumbel = -torch.log(-torch.log(noise.clamp(min=1e-20, max=1.0 - 1e-7)))
    return (scaled + gumbel).argmax(dim=-1)


def _repeat_cache(cache: Any, n: int) -> Any:
    """The KV cache of P prompts expanded to P*n rows (row p*n + k is path k of prompt p)."""
    if n == 1:
        return cache
    if isinstance(cache, list):  # the built-in Transformer: [(k, v)] per layer
        return [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in cache]
    cache.batch_repeat_interleave(n)  # transformers Cache objects expand in place
    return cache


def _context_limit(model: torch.nn.Module) -> int | None:
    inner = getattr(model, "_orig_mod", model)
    if is_hf_model(inner):
        return getattr(inner.config, "max_position_embeddings", None)
    return inner.config.context_length


@dataclass
class Paths:
    """Generated paths of P prompts, n each: tokens[p * n + k] is path k of prompt p (eos-padded)."""

    tokens: torch.Tensor
    """[P * n, steps] int64; after a path's end-of-text every position holds end-of-text."""
    lengths: torch.Tensor
    """[P * n] tokens each path generated, its end-of-text included."""
    n: int

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths.sum())


@torch.no_grad()
def generate_paths(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, *,
                   eos_id: int | None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   seeds: Sequence[Sequence[int]] | None = None,
                   on_token: Callable[[int], None] | None = None) -> Paths:
    """Sample n paths for each prompt, all in one batch: one prefill per prompt, then the cache is
    shared n ways and every decoding step advances all P * n paths together.

    All prompts must have the same length (callers bucket by length). `seeds[p][k]` seeds path k of
    prompt p; greedy decoding (temperature 0) needs none. Stops when every path has produced
    `eos_id` or after max_new_tokens; with eos_id None it always generates max_new_tokens.
    """
    if not prompts:
        raise ValueError("no prompts")
    length = len(prompts[0])
    if length == 0 or any(len(p) != length for p in prompts):
        raise ValueError("generate_paths needs prompts of one non-zero length; bucket them by length")
    limit = _context_limit(model)
    if limit is not None and length + max_new_tokens > limit:
        raise ValueError(f"prompt length {length} + max_new_tokens {max_new_tokens} exceeds the context {limit}")
    generators = None
    if temperature > 0:
        if seeds is None or len(seeds) != len(prompts) or any(len(s) != n for s in seeds):
            raise ValueError(f"sampling needs seeds shaped [{len(prompts)}][{n}]")
        generators = [torch.Generator().manual_seed(int(s)) for row in seeds for s in row]
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.tensor(prompts, dtype=torch.long)
        logits, cache = model_outputs(model, input_ids)
        last = logits[:, -1, :].repeat_interleave(n, dim=0)
        cache = _repeat_cache(cache, n)
        rows = len(prompts) * n
        out = torch.full((rows, max_new_tokens), eos_id if eos_id is not None else 0, dtype=torch.long)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool)
        for step in range(max_new_tokens):
            token = sample_rows(last, temperature, top_p, generators, top_k)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                newly = (token == eos_id) & ~finished
                lengths[newly] = step + 1
                finished |= newly
            out[:, step] = token
            if on_token is not None:
                on_token(step)
            if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                out = out[:, : step + 1]
                break
            logits, cache = model_outputs(model, token.unsqueeze(1), cache)
            last = logits[:, -1, :]
        return Paths(out, lengths, n)
    finally:
        model.train(was_training)


def bucket_by_length(prompts: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Indices of prompts grouped by token length, so each group can be one batch without padding."""
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    return buckets
