"""The adaptive rule (adaptive.py): drafting pauses sooner the more a draft costs, prompt lookup's schedule is
the rule of tokens per verification forward it always was, a useless draft model is probed rarely and stays
paused from one generation to the next, and the output stays plain greedy decoding's throughout."""
from __future__ import annotations

import random

import torch

from ryzen_core import Transformer, generate
from ryzen_plugin_speculative import PromptLookupDrafter, SpeculationStats, speculative_generate
from ryzen_plugin_speculative.adaptive import DraftLength
from ryzen_plugin_speculative.draft_model import DraftModelDrafter, LookupThenModelDrafter
from ryzen_plugin_speculative.step_cost import measured_draft_cost


def run_schedule(schedule: DraftLength, steps: int, kept_of) -> list[int]:
    """Drive the rule for `steps` steps, `kept_of(drafted)` drafts kept at each drafting step, one
    draft-model forward per drafted token; the draft lengths it asked for (0: a plain step)."""
    lengths = []
    for _ in range(steps):
        length = schedule.next()
        lengths.append(length)
        if length:
            schedule.update(length, kept_of(length), draft_forwards=length)
    return lengths


def test_a_costlier_draft_pauses_sooner():
    one_kept = lambda drafted: 1  # noqa: E731 - two tokens per verification: break-even for a free draft
    first_pause = {}
    for cost in (0.0, 0.1, 0.3, 0.6):
        lengths = run_schedule(DraftLength(8, draft_cost=cost), 40, one_kept)
        first_pause[cost] = lengths.index(0) if 0 in lengths else len(lengths)
    assert first_pause[0.0] == 40  # free drafts yielding 2 per forward of cost 2: never paused
    assert first_pause[0.1] > first_pause[0.3] >= first_pause[0.6] >= 1


def test_a_costlier_draft_drafts_less_over_a_long_stream():
    half_kept = lambda drafted: drafted // 2  # noqa: E731
    drafting_steps = [sum(1 for n in run_schedule(DraftLength(8, draft_cost=cost), 400, half_kept) if n)
                      for cost in (0.0, 0.2, 0.4)]
    assert drafting_steps[0] > drafting_steps[1] > drafting_steps[2]


def old_rule_lengths(outcomes: list[int], max_draft: int = 8, threshold: float = 2.0) -> list[int]:
    """The rule before draft costs counted (tokens per verification forward against the threshold; a kept
    draft resets the pause), on `outcomes`: drafts kept at each drafting step, capped by the length."""
    length = max(1, max_draft // 2)
    tokens_per_forward, paused_for, pause, asked = length + 1.0, 0, 4, []
    for kept in outcomes:
        if paused_for:
            paused_for -= 1
            asked.append(0)
            continue
        asked.append(length)
        kept = min(kept, length)
        drafted, length = length, min(max_draft, length + 2) if kept == length else max(1, length - 1)
        tokens_per_forward = 0.5 * tokens_per_forward + 0.5 * (kept + 1)
        pause = 4 if kept > 0 else pause
        if tokens_per_forward < threshold:
            paused_for, pause, tokens_per_forward = pause, min(64, 2 * pause), threshold
    return asked


def test_prompt_lookup_keeps_the_rule_it_had():
    outcomes = [random.Random(seed).choice([0, 0, 0, 1, 2, 8]) for seed in range(600)]
    schedule, asked = DraftLength(8), []
    for kept in outcomes:
        length = schedule.next()
        asked.append(length)
        if length:
            schedule.update(length, min(kept, length))
    assert asked == old_rule_lengths(outcomes)
    assert asked.count(0) > 100 and sum(asked) > 100  # paused and drafted both


def test_a_useless_draft_model_is_probed_rarely_and_one_as_slow_as_the_target_never():
    lengths = run_schedule(DraftLength(8, draft_cost=0.7), 1000, lambda drafted: 0)
    drafted_late = sum(lengths[500:])
    assert 0 < drafted_late <= 5  # the pause has reached its longest: 64 x (2 - 1 + 0.7) = 109 steps
    assert max(run_schedule(DraftLength(8, draft_cost=1.0), 50, lambda drafted: drafted)) == 0


class WrongDrafter:
    """Drafts, as if by a model (one forward per drafted token), a token the target never picks next: its
    greedy token plus one."""

    def __init__(self, model):
        self.model, self.forwards = model, 0

    def propose(self, sequences, length, sampling=None):
        greedy = generate(self.model, sequences, 1)[:, -1:]
        self.forwards += length
        return ((greedy + 1) % self.model.config.vocab_size).expand(-1, length), None


def test_the_schedule_carries_a_pause_into_the_next_generation(model, prompt_suite):
    shared = DraftLength(6, draft_cost=0.5)
    drafted = []
    for prompt in prompt_suite[2:6]:
        stats = SpeculationStats()
        produced = speculative_generate(model, prompt, 40, drafter=WrongDrafter(model), draft_length=shared,
                                        stats=stats)
        assert torch.equal(produced, generate(model, prompt, 40))
        drafted.append(stats.drafted)
    fresh = SpeculationStats()
    speculative_generate(model, prompt_suite[5], 40, drafter=WrongDrafter(model),
                         draft_length=DraftLength(6, draft_cost=0.5), stats=fresh)
    assert drafted[0] > 0 and drafted[-1] < fresh.drafted


def test_greedy_identity_with_costed_schedules(model, prompt_suite, make_tiny_model, tokenizer):
    draft = make_tiny_model("builtin", tokenizer.vocab_size, seed=11)
    stats = SpeculationStats()
    for cost in (0.0, 0.3, 0.8):
        for prompt in prompt_suite:
            produced = speculative_generate(model, prompt, 32, drafter=DraftModelDrafter(draft), stats=stats,
                                            draft_length=DraftLength(5, draft_cost=cost))
            assert torch.equal(produced, generate(model, prompt, 32))
    assert stats.drafted > 0 and stats.pauses > 0


def test_auto_pauses_a_useless_draft_model_but_not_prompt_lookup(model, prompt_suite, make_tiny_model, tokenizer):
    draft = make_tiny_model("builtin", tokenizer.vocab_size, seed=11)
    never_pays = DraftLength(8, draft_cost=1.0)  # as slow as the target: the model never drafts
    used = {"lookup": 0, "model": 0}
    for prompt in prompt_suite:
        drafter = LookupThenModelDrafter(PromptLookupDrafter(3, 3), DraftModelDrafter(draft), never_pays)
        produced = speculative_generate(model, prompt, 40, drafter=drafter)
        assert torch.equal(produced, generate(model, prompt, 40))
        used = {kind: used[kind] + drafter.used[kind] for kind in used}
        assert drafter.forwards == 0
    assert used["lookup"] > 0 and used["model"] == 0


def test_the_draft_cost_is_measured_for_either_architecture(model, make_tiny_model, tokenizer):
    """A step-time ratio from cached one-token forwards of a built-in model and a Llama, either way round;
    its value is the machine's, so only that it is one is asserted."""
    other = make_tiny_model("llama" if isinstance(model, Transformer) else "builtin", tokenizer.vocab_size, seed=5)
    for target, draft in ((model, other), (other, model)):
        assert 0 < measured_draft_cost(target, draft) < float("inf")
