"""Greedy speculative decoding gives plain greedy decoding's tokens (ryzen_core.generate), on the built-in
model and on an HF Llama, over prompts where drafts are kept and prompts where they are not."""
from __future__ import annotations

import torch

from ryzen_core import generate
from ryzen_plugin_speculative import PromptLookupDrafter, SpeculationStats, speculative_generate
from ryzen_plugin_speculative.adaptive import DraftLength

NEW_TOKENS = 48


def test_greedy_output_is_plain_greedy(model, prompt_suite):
    stats = SpeculationStats()
    for prompt in prompt_suite:
        expected = generate(model, prompt, NEW_TOKENS)
        produced = speculative_generate(model, prompt, NEW_TOKENS, stats=stats)
        assert torch.equal(produced, expected), f"prompt of {prompt.shape[1]} tokens diverged"
    # Both paths of verification ran: drafts kept and drafts cut short.
    assert stats.accepted > 0 and stats.drafted > stats.accepted
    assert stats.target_forwards < stats.tokens  # more than one token per forward somewhere


def test_fixed_long_drafts_stay_identical(model, prompt_suite):
    """Without adaptation every match is drafted at full length: many rollbacks, the same output."""
    stats = SpeculationStats()
    for prompt in prompt_suite:
        produced = speculative_generate(model, prompt, NEW_TOKENS, stats=stats,
                                        drafter=PromptLookupDrafter(4, 1), draft_length=DraftLength(12, adaptive=False))
        assert torch.equal(produced, generate(model, prompt, NEW_TOKENS))
    assert stats.drafted - stats.accepted > 20


def test_batch_keeps_each_rows_greedy_output(model, prompt_suite):
    rows = torch.cat([p[:, -5:] for p in prompt_suite[:3]] + [prompt_suite[-1][:, :5]])
    assert torch.equal(speculative_generate(model, rows, NEW_TOKENS), generate(model, rows, NEW_TOKENS))


def test_eos_and_on_token_follow_the_plain_loop(model, prompt_suite, tokenizer):
    eos = tokenizer.encode(" ")[0]  # frequent, so rows finish mid-draft
    rows = torch.cat([p[:, -5:] for p in prompt_suite[:4]])
    steps: list[int] = []
    produced = speculative_generate(model, rows, NEW_TOKENS, eos_token_id=eos, on_token=steps.append)
    expected = generate(model, rows, NEW_TOKENS, eos_token_id=eos)
    assert torch.equal(produced, expected)
    assert steps == list(range(produced.shape[1] - rows.shape[1]))


def test_zero_new_tokens_and_bad_arguments(model, prompt_suite):
    prompt = prompt_suite[0]
    assert torch.equal(speculative_generate(model, prompt, 0), prompt)
    for bad in (dict(max_new_tokens=-1), dict(max_new_tokens=2, temperature=-1.0)):
        try:
            speculative_generate(model, prompt, **bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")
