"""Speculative sampling draws from the target's distribution: a chi-squared test over 10,000 seeded samples of
a 4-token continuation against the exact distribution of plain sampling, computed from the model. The same
test rejects a broken acceptance rule (always keep the drafts).

The target has 6 tokens, so the 6^4 = 1296 continuations can be counted. The first token comes from the
prefill; the other three from verifications of drafts of up to 2 tokens (kept, then a bonus token; or cut
short, then a token from the residual, and the draft model's cache rolled back for the next draft). The
draft model is the target with noise added to its weights: its q is neither one-hot nor p (about half its
drafts are kept). Samples run 50 rows to a batch, so 10,000 take 200 generations. A batch keeps the
smallest accepted length of its rows, which at 50 rows is nearly always 0: the rows that accepted a draft
emit it and the others their residual sample. A smaller run at batch 1 covers drafts kept whole and the
bonus token.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from ryzen_core import filter_logits, lm_logits
from ryzen_plugin_speculative import PromptLookupDrafter, SpeculationStats, acceptance, speculative_generate
from ryzen_plugin_speculative.adaptive import DraftLength
from ryzen_plugin_speculative.draft_model import DraftModelDrafter

SAMPLES, BATCH, NEW_TOKENS, DRAFT = 10_000, 50, 4, 2
PROMPT = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2]])  # every token occurs, so prompt lookup always has a match
PLAIN, FILTERED = dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)


@pytest.fixture(scope="module")
def draft_model(small_model):
    draft = copy.deepcopy(small_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in draft.parameters():
            if parameter.dim() == 2:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return draft.eval()


def exact_distribution(model, sampling) -> dict[tuple[int, ...], float]:
    """P(t1 .. t4 | PROMPT) under plain sampling with these settings, from one forward over every prefix."""
    vocab = model.config.vocab_size
    prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=NEW_TOKENS - 1)))
    sequences = torch.cat([PROMPT.expand(len(prefixes), -1), prefixes], dim=1)
    with torch.inference_mode():
        logits = lm_logits(model, sequences)[:, PROMPT.shape[1] - 1:]  # [N, 4, V]: the four next-token positions
        scaled = filter_logits(logits.reshape(-1, vocab), sampling["temperature"], sampling.get("top_k", 0),
                               sampling.get("top_p", 1.0))
        probs = torch.softmax(scaled, dim=-1).view(len(prefixes), NEW_TOKENS, vocab)
    table = {}
    for row, prefix in enumerate(prefixes.tolist()):
        chain = float(torch.prod(torch.stack([probs[row, i, prefix[i]] for i in range(NEW_TOKENS - 1)])))
        for last in range(vocab):
            table[(*prefix, last)] = chain * float(probs[row, NEW_TOKENS - 1, last])
    return table


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


def speculative_samples(model, sampling, new_drafter, samples: int = SAMPLES, batch: int = BATCH,
                        stats: SpeculationStats | None = None) -> dict[tuple[int, ...], int]:
    generator = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(samples // batch):
        out = speculative_generate(model, PROMPT.expand(batch, -1), NEW_TOKENS, generator=generator,
                                   drafter=new_drafter(), draft_length=DraftLength(DRAFT, adaptive=False),
                                   stats=stats, **sampling)
        for row in out[:, PROMPT.shape[1]:].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


@pytest.mark.parametrize("sampling", [PLAIN, FILTERED], ids=["temperature-1", "filtered"])
def test_sampling_with_a_draft_model_is_plain_sampling(small_model, draft_model, sampling):
    stats = SpeculationStats()
    counts = speculative_samples(small_model, sampling, lambda: DraftModelDrafter(draft_model), stats=stats)
    assert chi_squared_p_value(counts, exact_distribution(small_model, sampling), SAMPLES) > 1e-3
    assert stats.draft_forwards > 0 and stats.drafted > 0


def test_sampling_with_prompt_lookup_is_plain_sampling(small_model):
    stats = SpeculationStats()
    counts = speculative_samples(small_model, PLAIN, lambda: PromptLookupDrafter(3, 1), stats=stats)
    assert chi_squared_p_value(counts, exact_distribution(small_model, PLAIN), SAMPLES) > 1e-3
    assert stats.drafted > 0


def test_one_row_at_a_time_keeps_the_distribution(small_model, draft_model):
    """At batch 1 both drafts are often kept (the bonus-token path), which large batches rarely reach."""
    stats, samples = SpeculationStats(), 1500
    counts = speculative_samples(small_model, PLAIN, lambda: DraftModelDrafter(draft_model), samples, 1, stats)
    assert chi_squared_p_value(counts, exact_distribution(small_model, PLAIN), samples) > 1e-3
    assert stats.verifications < stats.drafted  # some verifications scored 2 drafts ...
    assert stats.accepted > stats.verifications / 2  # ... and kept both often enough to matter


def always_accept(logits, drafts, draft_probs, temperature, top_k, top_p, generator):
    p = acceptance.target_probs(logits, temperature, top_k, top_p)
    k = drafts.shape[1]
    return k, torch.multinomial(p[:, k], 1, generator=generator).squeeze(-1)


def test_the_test_catches_a_broken_acceptance_rule(small_model, draft_model, monkeypatch):
    monkeypatch.setattr(acceptance, "verify_sampled", always_accept)
    counts = speculative_samples(small_model, PLAIN, lambda: DraftModelDrafter(draft_model))
    assert chi_squared_p_value(counts, exact_distribution(small_model, PLAIN), SAMPLES) < 1e-6
