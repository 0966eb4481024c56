"""The scheduler without HTTP: sequences of different lengths join and leave one batch, and what it makes
is token for token what `ryzen_core.generate` makes; cancellation frees the slot; stop strings cut."""
from __future__ import annotations

import queue

import pytest

from ryzen_plugin_serve.engine import Engine, Limits, Sampling

PROMPTS = ["def ", "import os\n", "class Parser(object):\n    def __init__(self", "return", "    for i in range("]


def started(loaded, **limits) -> Engine:
    model, tokenizer, context = loaded
    engine = Engine(model, tokenizer, context, Limits(**limits)).start()
    assert engine.ready.wait(timeout=600)
    return engine


def final_event(events: queue.Queue):
    while (event := events.get(timeout=600)).kind == "text":
        pass
    return event


def long_running_prompt(greedy) -> str:
    """A prompt whose greedy continuation does not end within 6 tokens (so it can be cut mid-way)."""
    prompt = next((p for p in PROMPTS if len(greedy(p, 6)) == 6), None)
    assert prompt is not None, "every prompt's continuation ends early; add one"
    return prompt


def test_sequences_of_different_lengths_joining_and_leaving_match_generate(loaded, greedy):
    engine = started(loaded, max_batch=4)
    tokenizer = loaded[1]
    lengths = [3, 12, 7, 20, 5]
    try:
        events = [queue.Queue() for _ in PROMPTS]
        with engine.paused():  # four join at once, the fifth waits for the first slot to free
            seqs = [engine.submit(tokenizer.encode(p), Sampling(n), q.put) for p, n, q in zip(PROMPTS, lengths, events)]
        finals = [final_event(q) for q in events]
    finally:
        engine.shutdown(5)
    for prompt, n, seq, final in zip(PROMPTS, lengths, seqs, finals):
        assert final.kind == "done" and final.completion_tokens == len(seq.tokens)
        assert seq.tokens == greedy(prompt, n), prompt
    occupancy = engine.metrics.occupancy.collect()[0].samples
    steps_at = {s.labels["le"]: s.value for s in occupancy if s.name.endswith("_bucket")}
    assert steps_at["3.0"] < steps_at["4.0"], "no decode step ran four sequences at once"
    assert sorted(engine.runner.free) == [0, 1, 2, 3]  # every slot back


def test_a_cancelled_sequence_leaves_the_batch_and_frees_its_slot(loaded, greedy):
    engine = started(loaded, max_batch=1)
    tokenizer = loaded[1]
    prompt = long_running_prompt(greedy)
    cut, waiting = queue.Queue(), queue.Queue()

    def cancel_after_first_token(event):
        cut.put(event)
        engine.cancel(first)

    try:
        with engine.paused():
            first = engine.submit(tokenizer.encode(prompt), Sampling(20), cancel_after_first_token)
            second = engine.submit(tokenizer.encode(prompt), Sampling(4), waiting.put)
            dropped = engine.submit(tokenizer.encode(prompt), Sampling(4), waiting.put)
            engine.cancel(dropped)  # cancelled while queued: never prefilled
        first_final, second_final = final_event(cut), final_event(waiting)
    finally:
        engine.shutdown(5)
    assert first_final.finish_reason == "cancelled" and len(first.tokens) < 6  # cut at its first text
    assert second_final.kind == "done" and second.tokens == greedy(prompt, 4)
    assert dropped.tokens == [] and engine.active == []


def test_a_stop_string_ends_the_completion_before_it(loaded, greedy):
    engine = started(loaded)
    tokenizer = loaded[1]
    prompt = long_running_prompt(greedy)
    full = tokenizer.decode(greedy(prompt, 6))
    stop = full[len(full) // 2:][:3]
    events = queue.Queue()
    try:
        engine.submit(tokenizer.encode(prompt), Sampling(6, stop=[stop]), events.put)
        pieces = []
        while (event := events.get(timeout=600)).kind == "text":
            pieces.append(event.text)
    finally:
        engine.shutdown(5)
    assert event.finish_reason == "stop" and "".join(pieces) == full[:full.index(stop)]


@pytest.mark.parametrize("prompt_tokens, max_tokens, problem", [
    (0, 4, "empty"), (64, 0, "more than the 63"), (10, 60, "exceeds the model's context"),
])
def test_requests_the_model_cannot_hold_are_refused_before_queueing(loaded, prompt_tokens, max_tokens, problem):
    model, tokenizer, context = loaded
    engine = Engine(model, tokenizer, context)
    assert context == 64 and problem in engine.check([1] * prompt_tokens, max_tokens)
