"""The two training objectives on task data: supervised warm-up and GRPO.

GRPO (Shao et al. 2024, DeepSeekMath): for each prompt sample a group of G completions, reward each
with the verifier, and use the group-normalized reward (r - mean) / std as every token's advantage.
The loss is PPO's clipped surrogate per completion token, averaged over each completion's tokens
and then over completions, plus an optional KL penalty to a frozen reference model (the k3
estimator exp(ref - new) - (ref - new) - 1, which is unbiased and never negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ryzen_core import lm_logits

IGNORE = -100  # F.cross_entropy's ignore_index


def sft_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for supervised warm-up: prompt + completion per row, right-padded; only the
    completion tokens (its end-of-text included) are targets, so the loss is -log p(answer | prompt)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    inputs = torch.full((len(rows), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), IGNORE, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(p) - 1: len(row) - 1] = torch.tensor(row[len(p):])
    return inputs, targets


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)


def completion_logprobs(model: torch.nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log p(completion token t | prompt, earlier completion tokens) for every position: [B, S].

    prompts [B, L] and completions [B, S] (eos-padded; the caller masks the padding)."""
    sequence = torch.cat([prompts, completions], dim=1)
    logits = lm_logits(model, sequence[:, :-1])[:, prompts.shape[1] - 1:, :]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def completion_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] float: 1 for the tokens each completion generated (its end-of-text included)."""
    return (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).float()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per row of rewards [P, G]; zero for a group whose
    completions all got the same reward (no completion is better than another)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


@dataclass
class GrpoTerms:
    loss: torch.Tensor
    clip_fraction: float
    kl: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> GrpoTerms:
    """Clipped policy-gradient loss. logp/old_logp/ref_logp/mask: [B, S]; advantages: [B]."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    per_token = -surrogate
    kl_value = 0.0
    if ref_logp is not None and kl_coef > 0:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
        kl_value = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float()
        clip_fraction = float((clipped * mask).sum() / mask.sum().clamp(min=1))
    return GrpoTerms(loss, clip_fraction, kl_value)
