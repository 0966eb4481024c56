"""The draft-model drafter: a smaller model on the same tokenizer guesses the next tokens one by one, with
a KV cache of its own.

Greedy decoding drafts the draft model's argmax. Sampling drafts from the draft model's own distribution
after the same temperature / top_k / top_p processing as the target's (`ryzen_core.filter_logits`) and
hands that distribution q to the acceptance rule, which keeps d with probability min(1, p(d)/q(d)) and
otherwise samples the residual: the output is distributed exactly as the target's, whatever q is.

Rollback. The drafter remembers which tokens its cache holds. Before drafting it compares them with the
sequence as it now stands (the target kept a prefix of the drafts and appended a token of its own),
crops its cache to the longest common prefix (`kv_cache.crop_cache`) and feeds what is missing in one
forward: the accepted length, whatever the acceptance rule decided, and the tokens that arrived some
other way (prompt-lookup drafts under `drafter: auto`).
"""
from __future__ import annotations

import torch

from ryzen_core import context_length, filter_logits, is_hf_model, model_outputs

from .kv_cache import crop_cache


class DraftModelDrafter:
    """Drafts [B, k] from `model`, with their distributions [B, k, V] when sampling (None when greedy)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # An HF model's position limit is a soft one; the built-in model's embedding table is hard.
        self.limit = None if is_hf_model(model) else context_length(model)
        self.cache = None
        self.cached: torch.Tensor | None = None  # the tokens [B, C] whose keys and values the cache holds
        self.forwards = 0  # draft-model forwards, for the record

    def _common_prefix(self, sequences: torch.Tensor) -> int:
        if self.cached is None or self.cached.shape[0] != sequences.shape[0]:
            return 0
        length = min(self.cached.shape[1], sequences.shape[1])
        same = (self.cached[:, :length] == sequences[:, :length]).all(dim=0)
        return int(same.int().cumprod(dim=0).sum())

    def _catch_up(self, sequences: torch.Tensor) -> torch.Tensor:
        """Roll the cache back to what still holds and feed the rest: logits [B, V] for the next position."""
        kept = min(self._common_prefix(sequences), sequences.shape[1] - 1)  # feed at least one token
        self.cache = crop_cache(self.cache, kept) if kept > 0 else None
        logits, self.cache = model_outputs(self.model, sequences[:, kept:], self.cache)
        self.cached, self.forwards = sequences, self.forwards + 1
        return logits[:, -1]

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        logits, self.cache = model_outputs(self.model, token.unsqueeze(1), self.cache)
        self.cached = torch.cat([self.cached, token.unsqueeze(1).to(self.cached.dtype)], dim=1)
        self.forwards += 1
        return logits[:, -1]

    @torch.inference_mode()
    def propose(self, sequences: torch.Tensor, length: int, sampling=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`length` drafts for every row (fewer near the draft model's context limit). `sampling` is
        (temperature, top_k, top_p, generator), or None for greedy."""
        if self.limit is not None:
            length = min(length, self.limit - sequences.shape[1] + 1)  # positions fed: T + length - 1
        if length <= 0:
            return sequences[:, :0], None
        logits = self._catch_up(sequences)
        drafts, distributions = [], []
        for i in range(length):
            if sampling is None:
                token = logits.argmax(dim=-1)
            else:
                temperature, top_k, top_p, generator = sampling
                q = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                distributions.append(q)
            drafts.append(token)
            if i + 1 < length:  # the last draft is verified by the target without being fed here
                logits = self._step(token)
        return (torch.stack(drafts, dim=1).to(sequences.dtype),
                torch.stack(distributions, dim=1) if distributions else None)


class LookupThenModelDrafter:
    """`drafter: auto` with a draft model: prompt lookup where the text so far repeats (every row has a
    match of `lookup`'s shortest n-gram), the draft model elsewhere. Lookup drafts cost no forward and
    are right more often than a small model where they exist; the draft model catches up on them.

    `model_schedule` (a DraftLength counting the draft model's cost) says when and how much the draft
    model may draft and learns from the draft model's steps alone; the decoding loop's schedule, from
    prompt lookup's. So a useless draft model is paused without pausing prompt lookup."""

    def __init__(self, lookup, model_drafter: DraftModelDrafter, model_schedule=None):
        self.lookup, self.model_drafter, self.model_schedule = lookup, model_drafter, model_schedule
        self.used = {"lookup": 0, "model": 0}  # steps each drafted
        self.last = None  # which drafted the drafts being verified

    @property
    def forwards(self) -> int:
        return self.model_drafter.forwards

    def propose(self, sequences: torch.Tensor, length: int, sampling=None):
        drafts, _ = self.lookup.propose(sequences, length)
        if drafts.shape[1] > 0:
            self.used["lookup"], self.last = self.used["lookup"] + 1, "lookup"
            return drafts, None  # deterministic: q is one-hot
        if self.model_schedule is not None:
            length = min(length, self.model_schedule.next())
            if length == 0:
                self.last = None
                return sequences[:, :0], None
        self.used["model"], self.last = self.used["model"] + 1, "model"
        return self.model_drafter.propose(sequences, length, sampling)

    def verified(self, drafted: int, kept: int, draft_forwards: int) -> bool:
        """The target kept `kept` of the `drafted` tokens proposed last, made by `draft_forwards` forwards:
        True when they were the draft model's and its schedule took the outcome."""
        if self.last != "model" or self.model_schedule is None:
            return False
        self.model_schedule.update(drafted, kept, draft_forwards)
        return True
