"""Drafters: cheap guesses of the next tokens, which the target model then verifies.

A drafter's `propose(sequences, length, sampling)` returns drafts [B, k] with k <= length (k = 0: no draft
this step) and, for a stochastic drafter, the distributions [B, k, V] they were drawn from; a deterministic
drafter returns None there, which the acceptance rule reads as a one-hot q. `sampling` is (temperature,
top_k, top_p, generator) while sampling, None while greedy. A drafter running a model counts its forwards
in `forwards` (the adaptive rule charges them). One keeping a schedule of its own has `verified(drafted,
kept, draft_forwards)`, called after each verification: True when its own schedule took the outcome, which
the loop's schedule then does not see. The draft model's drafters are in draft_model.py.
"""
from __future__ import annotations

import torch


class PromptLookupDrafter:
    """Prompt lookup decoding (Saxena, 2023): find the latest earlier occurrence of the last n tokens of
    the prompt plus the text generated so far, and propose the tokens that followed it.

    n runs from `ngram_max` down to `ngram_min`; the first n with a match wins. No second model: it pays
    where the output repeats its input (editing or continuing code, quoting, summarising).
    """

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose_row(self, sequence: torch.Tensor, length: int) -> torch.Tensor:
        """Up to `length` drafted tokens [k] following the latest match of the sequence's own suffix."""
        total = sequence.shape[0]
        for n in range(min(self.ngram_max, total - 1), self.ngram_min - 1, -1):
            suffix = sequence[total - n:]
            # Windows starting at 0 .. total-1-n: each is followed by at least one token, and the suffix
            # itself (starting at total-n) is not among them.
            windows = sequence[:total - 1].unfold(0, n, 1)
            starts = (windows == suffix).all(dim=1).nonzero().flatten()
            if starts.numel():
                # The latest match still followed by `length` tokens; else the earliest, followed by the most.
                full = starts[starts <= total - n - length]
                follow = int(full[-1] if full.numel() else starts[0]) + n
                return sequence[follow:follow + length]
        return sequence[:0]

    def propose(self, sequences: torch.Tensor, length: int, sampling=None) -> tuple[torch.Tensor, None]:
        """Drafts [B, k] for every row, k being the shortest row's draft (a batch verifies one length);
        the same whether sampling or not."""
        if length <= 0:
            return sequences[:, :0], None
        rows = [self.propose_row(row, length) for row in sequences]
        k = min(row.shape[0] for row in rows)
        return torch.stack([row[:k] for row in rows]), None
