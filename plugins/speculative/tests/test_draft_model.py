"""The draft-model drafter: greedy output identical to plain greedy decoding (ryzen_core.generate) on the
built-in model and an HF Llama, drafting with a model of the same or another architecture; its own cache
rolled back correctly after rejections; prompt lookup and the draft model together (`drafter: auto`)."""
from __future__ import annotations

import copy

import pytest
import torch

from ryzen_core import Transformer, TransformerConfig, generate, is_hf_model
from ryzen_plugin_speculative import PromptLookupDrafter, SpeculationStats, speculative_generate
from ryzen_plugin_speculative.adaptive import DraftLength
from ryzen_plugin_speculative.draft_model import DraftModelDrafter, LookupThenModelDrafter

NEW_TOKENS = 40


def noisy_copy(model: torch.nn.Module, noise: float, seed: int = 3) -> torch.nn.Module:
    """A draft that agrees with `model` often but not always: its weights plus Gaussian noise."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            if parameter.dim() == 2:
                parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
    return draft.eval()


@pytest.fixture(scope="module")
def draft(model):
    return noisy_copy(model, 0.03)


def test_greedy_output_with_a_draft_model_is_plain_greedy(model, draft, prompt_suite):
    stats = SpeculationStats()
    for prompt in prompt_suite:
        produced = speculative_generate(model, prompt, NEW_TOKENS, drafter=DraftModelDrafter(draft), stats=stats)
        assert torch.equal(produced, generate(model, prompt, NEW_TOKENS)), f"prompt of {prompt.shape[1]} tokens diverged"
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # drafts kept and drafts cut short
    assert stats.draft_forwards >= stats.verifications and stats.target_forwards < stats.tokens


class CheckedDrafter(DraftModelDrafter):
    """Drafts as a draft-model drafter that has lived through every earlier step, and checks them against a
    fresh drafter's (no cache yet) on the same sequence: a cache not rolled back right would differ."""

    def propose(self, sequences, length, sampling=None):
        drafts, probs = super().propose(sequences, length, sampling)
        fresh, _ = DraftModelDrafter(self.model).propose(sequences, length, sampling)
        assert torch.equal(drafts, fresh), f"drafts from the rolled-back cache differ at length {sequences.shape[1]}"
        self.checked = getattr(self, "checked", 0) + 1
        return drafts, probs


def test_the_draft_cache_after_rejections_drafts_what_a_fresh_one_does(model, draft, prompt_suite):
    stats = SpeculationStats()
    for prompt in prompt_suite[2:5]:
        drafter = CheckedDrafter(draft)
        produced = speculative_generate(model, prompt, NEW_TOKENS, drafter=drafter, stats=stats,
                                        draft_length=DraftLength(5, adaptive=False))
        assert torch.equal(produced, generate(model, prompt, NEW_TOKENS))
        assert drafter.checked > 1
    assert stats.drafted - stats.accepted > 10  # many rejections, each followed by a rollback


def test_a_draft_of_another_architecture_and_a_batch(model, tokenizer, prompt_suite, make_tiny_model):
    """A Llama drafting for the built-in model or the other way round: only the tokenizer must agree."""
    other = make_tiny_model("builtin" if is_hf_model(model) else "llama", tokenizer.vocab_size, seed=7)
    rows = torch.cat([p[:, -6:] for p in prompt_suite[:4]])
    for prompts in (prompt_suite[:3], [rows]):
        for prompt in prompts:
            produced = speculative_generate(model, prompt, NEW_TOKENS, drafter=DraftModelDrafter(other))
            assert torch.equal(produced, generate(model, prompt, NEW_TOKENS))


def test_a_draft_with_a_short_context_stops_drafting_at_its_limit(model, tokenizer, prompt_suite):
    short = Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=64)).eval()
    prompt = prompt_suite[2][:, :50]  # 50 + 40 tokens: the last 26 past the draft's context
    drafter = DraftModelDrafter(short)
    produced = speculative_generate(model, prompt, NEW_TOKENS, drafter=drafter,
                                    draft_length=DraftLength(4, adaptive=False))
    assert torch.equal(produced, generate(model, prompt, NEW_TOKENS))
    assert drafter.cached.shape[1] <= 64
    assert drafter.propose(produced, 4)[0].shape[1] == 0


def test_lookup_then_model_uses_both_and_stays_identical(model, draft, prompt_suite):
    used = {"lookup": 0, "model": 0}
    for prompt in prompt_suite:
        drafter = LookupThenModelDrafter(PromptLookupDrafter(3, 3), DraftModelDrafter(draft))
        produced = speculative_generate(model, prompt, NEW_TOKENS, drafter=drafter)
        assert torch.equal(produced, generate(model, prompt, NEW_TOKENS))
        used = {kind: used[kind] + drafter.used[kind] for kind in used}
    assert used["lookup"] > 0 and used["model"] > 0
