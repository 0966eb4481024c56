"""Speculative sampling draws from the target's distribution: a chi-squared test over seeded samples of a
short continuation against the exact distribution of plain sampling, computed from the model. The same
test rejects a broken acceptance rule (always keep the draft).

The continuation is 3 tokens: the first comes from the prefill, the next two from one verification of a
1-token draft (kept, then a bonus token; or rejected, then a token from the residual). A fixed drafter
proposes the same token every step, so the rule runs on every sample whatever was drawn before.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ryzen_core import filter_logits, lm_logits
from ryzen_plugin_speculative import acceptance, speculative_generate
from ryzen_plugin_speculative.adaptive import DraftLength

SAMPLES = 3000
PROMPT = torch.tensor([[1, 2, 3, 1]])
SAMPLING = [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)]


class FixedDrafter:
    def __init__(self, token: int):
        self.token = token

    def propose(self, sequences, length):
        return torch.full((sequences.shape[0], min(length, 1)), self.token, dtype=sequences.dtype), None


def exact_distribution(model, sampling) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3 | PROMPT) under plain sampling with these settings."""
    def step(prefix):
        logits = lm_logits(model, prefix)[:, -1]
        return torch.softmax(filter_logits(logits, sampling["temperature"], sampling.get("top_k", 0),
                                           sampling.get("top_p", 1.0)), dim=-1)[0]

    vocab = model.config.vocab_size
    with torch.inference_mode():
        first = step(PROMPT)
        second = {a: step(torch.cat([PROMPT, torch.tensor([[a]])], 1)) for a in range(vocab)}
        third = {(a, b): step(torch.cat([PROMPT, torch.tensor([[a, b]])], 1))
                 for a, b in itertools.product(range(vocab), repeat=2)}
    return {(a, b, c): float(first[a] * second[a][b] * third[(a, b)][c])
            for a, b, c in itertools.product(range(vocab), repeat=3)}


def chi_squared_p_value(counts: dict, probabilities: dict, samples: int) -> float:
    """Goodness of fit; cells expected fewer than 5 times are pooled into one."""
    expected, observed, pooled_expected, pooled_observed = [], [], 0.0, 0
    for cell, p in probabilities.items():
        if p * samples >= 5:
            expected.append(p * samples)
            observed.append(counts.get(cell, 0))
        else:
            pooled_expected += p * samples
            pooled_observed += counts.get(cell, 0)
    expected.append(pooled_expected)
    observed.append(pooled_observed + sum(n for cell, n in counts.items() if cell not in probabilities))
    e, o = torch.tensor(expected, dtype=torch.float64), torch.tensor(observed, dtype=torch.float64)
    statistic = float(((o - e) ** 2 / e.clamp(min=1e-12)).sum())
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def speculative_samples(model, sampling, batch: int = 1) -> dict[tuple[int, ...], int]:
    generator = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(SAMPLES // batch):
        out = speculative_generate(model, PROMPT.expand(batch, -1), 3, generator=generator,
                                   drafter=FixedDrafter(0), draft_length=DraftLength(1, adaptive=False), **sampling)
        for row in out[:, PROMPT.shape[1]:].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


@pytest.mark.parametrize("sampling", SAMPLING)
def test_speculative_sampling_matches_plain_sampling(small_model, sampling):
    probabilities = exact_distribution(small_model, sampling)
    assert chi_squared_p_value(speculative_samples(small_model, sampling), probabilities, SAMPLES) > 1e-3


def test_a_batch_keeps_the_distribution(small_model):
    """Rows of a batch keep the smallest accepted length; each row's tokens stay target samples."""
    sampling = SAMPLING[0]
    counts = speculative_samples(small_model, sampling, batch=100)
    assert chi_squared_p_value(counts, exact_distribution(small_model, sampling), SAMPLES) > 1e-3


def always_accept(logits, drafts, draft_probs, temperature, top_k, top_p, generator):
    p = acceptance.target_probs(logits, temperature, top_k, top_p)
    k = drafts.shape[1]
    return k, torch.multinomial(p[:, k], 1, generator=generator).squeeze(-1)


def test_the_test_catches_a_broken_acceptance_rule(small_model, monkeypatch):
    monkeypatch.setattr(acceptance, "verify_sampled", always_accept)
    sampling = SAMPLING[0]
    counts = speculative_samples(small_model, sampling)
    assert chi_squared_p_value(counts, exact_distribution(small_model, sampling), SAMPLES) < 1e-6
