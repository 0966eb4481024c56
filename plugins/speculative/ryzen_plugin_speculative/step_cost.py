"""What a draft model's step costs in steps of the target: the `draft_cost` of the adaptive rule.

Measured once, when the plugin loads the draft model: one-token cached forwards of each model at batch 1
after a short context, alternated so that both see the same machine, and the ratio of their fastest
times. Not of their medians: on a shared machine a forward of a millisecond is often preempted, which only
ever adds time, and with a few rounds a median can land on a preempted draft step and a clean target step
(a median ratio of 0.93 was seen for a draft whose step costs 0.15 of the target's, which would have
switched a good draft model off). Tiny models are dominated by per-operation overhead rather than by their
weights, so a draft of 1/8 the parameters can cost 0.4-0.7 of the target's step; the parameter ratio would
say 0.13.
"""
from __future__ import annotations

import time

import torch

from ryzen_core import context_length, model_outputs

from .kv_cache import crop_cache

CONTEXT, ROUNDS, BUDGET_S = 32, 15, 2.0


def _one_token_step(model: torch.nn.Module, context: int):
    """A call timing one cached forward over one token after `context` tokens; the cache is cropped back
    after each call (a transformers cache grows in place)."""
    _, cache = model_outputs(model, torch.zeros(1, context, dtype=torch.long))
    token = torch.zeros(1, 1, dtype=torch.long)

    def call() -> float:
        start = time.perf_counter()
        _, grown = model_outputs(model, token, cache)
        elapsed = time.perf_counter() - start
        crop_cache(grown, context)
        return elapsed

    return call


@torch.inference_mode()
def measured_draft_cost(target: torch.nn.Module, draft: torch.nn.Module, rounds: int = ROUNDS,
                        budget_s: float = BUDGET_S) -> float:
    """The fastest one-token step of `draft` over that of `target` (both in eval mode): a warm-up round,
    then up to `rounds` alternated rounds, fewer once `budget_s` seconds have passed (3 at least)."""
    context = min(CONTEXT, context_length(target) - 1, context_length(draft) - 1)
    steps = {"target": _one_token_step(target, context), "draft": _one_token_step(draft, context)}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    deadline = time.perf_counter() + budget_s
    for round_ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
        if round_ >= 2 and time.perf_counter() > deadline:
            break
    return min(times["draft"]) / min(times["target"])
