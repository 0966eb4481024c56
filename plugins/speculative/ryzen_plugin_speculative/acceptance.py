"""Verification: which drafted tokens the target keeps, and the one token it adds after them.

Both rules take the target's logits [B, k+1, V] from one forward over [last token, d_1 .. d_k]: row i
is the target's prediction for the position of d_{i+1} (row k: the position after the last draft).
They return (n, next_tokens): the first n drafts are kept in every row, then next_tokens [B] follows.

A batch keeps one length, the smallest any row accepted. That stays exact: a row that accepted more
emits its own accepted draft d_{n+1} at position n+1 (a valid target sample there), and the rest of
its accepted drafts are dropped, which only stops that row early, at a point its own tokens do not
decide.
"""
from __future__ import annotations

import torch

from ryzen_core import filter_logits


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Keep drafts while they equal the target's argmax; then the target's argmax at the first miss
    (or after the last draft). The output is plain greedy decoding's, token for token."""
    targets = logits.argmax(dim=-1)  # [B, k+1]
    k = drafts.shape[1]
    kept_per_row = (targets[:, :k] == drafts).int().cumprod(dim=1).sum(dim=1)
    n = int(kept_per_row.min()) if k else 0
    return n, targets[:, n]


def target_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution plain sampling draws from at each position: [B, k+1, V]."""
    batch, positions, vocab = logits.shape
    scaled = filter_logits(logits.reshape(batch * positions, vocab), temperature, top_k, top_p)
    return torch.softmax(scaled, dim=-1).view(batch, positions, vocab)


def verify_sampled(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                   temperature: float, top_k: int, top_p: float,
                   generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep d_i with probability
    min(1, p(d_i) / q(d_i)); at the first rejection draw from normalize(max(0, p - q)); when every
    draft is kept draw a bonus token from p. `draft_probs` [B, k, V] is q; None means one-hot q (a
    deterministic drafter), so d_i is kept with probability p(d_i) and the residual is p without d_i.
    The tokens are distributed exactly as plain sampling from p."""
    p = target_probs(logits, temperature, top_k, top_p)
    batch, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k]
    q_draft = torch.ones_like(p_draft) if draft_probs is None else \
        draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    uniform = torch.rand(batch, k, generator=generator, device=logits.device)
    kept = (uniform * q_draft < p_draft).int()  # u < p/q without dividing by a q of 0
    kept_per_row = kept.cumprod(dim=1).sum(dim=1)
    n = int(kept_per_row.min()) if k else 0
    if n == k:
        corrected = p[:, k]  # every row kept every draft: the bonus token
    else:
        q = torch.nn.functional.one_hot(drafts[:, n], p.shape[-1]).to(p.dtype) if draft_probs is None \
            else draft_probs[:, n]
        residual = (p[:, n] - q).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        # A row whose residual has no mass kept its draft here (p >= q everywhere then); its draw is unused.
        corrected = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, n])
    sampled = torch.multinomial(corrected, 1, generator=generator).squeeze(-1)
    if n == k:
        return n, sampled
    return n, torch.where(kept_per_row > n, drafts[:, n], sampled)
