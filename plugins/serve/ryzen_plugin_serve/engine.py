"""The scheduler: one thread that owns the model and runs iteration-level continuous batching.

Every iteration it (1) admits waiting requests into free batch slots, prefilling the prompts that
join together and sampling each one's first token, then (2) runs one decode step that produces one token for every
active sequence. A sequence that finishes (end of text, a stop string, max_tokens, its deadline, or
its client went away) leaves the batch in the same iteration, freeing its slot for the next.

Requests talk to the engine through a `sink`: a function the scheduler calls with each `Event`
(the HTTP layer hands it to its event loop). Nothing here knows about HTTP.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ryzen_core import sample_next

from .metrics import ServerMetrics
from .runners import Abandoned, runner_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8
    """Sequences decoded together in one step."""
    max_queue: int = 64
    """Requests waiting for a slot; one more is refused (HTTP 429)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted; None: the model's context length minus one."""
    max_tokens: int | None = None
    """Most new tokens one request may ask for; None: whatever fits the context after its prompt."""
    timeout_s: float = 120.0
    """A request still running this long after it arrived ends with a timeout error."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    kind: str
    """'text' (a piece of the completion), 'done' (finished; `finish_reason` says why) or 'error'."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str = ""


class Refused(Exception):
    """The engine cannot take the request now: `reason` is 'queue_full', 'loading' or 'shutting_down'."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Sequence:
    """One request inside the engine: its prompt, what it has generated, and where its events go."""

    def __init__(self, prompt: list[int], sampling: Sampling, sink: Callable[[Event], None], deadline: float):
        self.prompt, self.sampling, self.sink, self.deadline = prompt, sampling, sink, deadline
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded completion already sent
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None
        self.slot = self.past = None
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


class Engine:
    """Serves `model` batched, or (given `runner`, a WholeRequestRunner) a backend one request at a time."""

    def __init__(self, model: torch.nn.Module | None, tokenizer, context_length: int, limits: Limits = Limits(),
                 metrics: ServerMetrics | None = None, runner=None):
        self.model, self.tokenizer, self.context_length, self.limits = model, tokenizer, context_length, limits
        if model is not None:
            model.eval()
        self.metrics = metrics or ServerMetrics(limits.max_batch)
        self.runner = runner or runner_for(model, limits.max_batch)
        self.whole_requests = getattr(self.runner, "whole_requests", False)
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.ready = threading.Event()
        self.accepting = True
        self._stopping = False
        self._wake = threading.Condition()
        self._gate = threading.Lock()  # held for one iteration; `paused()` holds it to freeze the scheduler
        self._thread = threading.Thread(target=self._run, name="ryzen-serve-scheduler", daemon=True)

    def describe(self) -> dict:
        """How this server runs requests, for /v1/models and /health."""
        if self.whole_requests:
            return {"backend": self.runner.name, "batching": "none: whole requests, one after another",
                    "streaming": "the whole completion arrives at once, when it is done",
                    "path": self.runner.description}
        kind = "continuous (batched decode step)" if self.runner.batched else "continuous (sequences stepped in turn)"
        return {"backend": "torch", "batching": kind, "max_batch": self.limits.max_batch}

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens or self.context_length - 1, self.context_length - 1)

    def start(self) -> "Engine":
        """Start the scheduler thread (loading and warming happen there); a second call does nothing."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    # ------------------------------------------------------------------ called from request handlers

    def submit(self, prompt: list[int], sampling: Sampling, sink: Callable[[Event], None]) -> Sequence:
        """Queue a request (its limits already checked by `check`), or raise Refused."""
        return self.submit_all([(prompt, sampling, sink)])[0]

    def submit_all(self, requests: list[tuple[list[int], Sampling, Callable[[Event], None]]]) -> list[Sequence]:
        """Queue the sequences of one request (its prompts times n) together: all of them, or Refused."""
        if not self.accepting:
            raise Refused("shutting_down", "the server is shutting down")
        if not self.ready.is_set():
            raise Refused("loading", "the model is still loading")
        deadline = time.perf_counter() + self.limits.timeout_s
        seqs = [Sequence(prompt, sampling, sink, deadline) for prompt, sampling, sink in requests]
        with self._wake:
            if len(self.waiting) + len(seqs) > self.limits.max_queue:
                raise Refused("queue_full", f"{len(self.waiting)} requests are already waiting; retry shortly")
            self.waiting.extend(seqs)
            self.metrics.waiting.set(len(self.waiting))
            self._wake.notify()
        return seqs

    def check(self, prompt: list[int], max_tokens: int) -> str | None:
        """Why a prompt of these tokens with this max_tokens cannot be served, or None."""
        if not prompt:
            return "prompt: the prompt is empty (it encodes to no tokens)"
        if len(prompt) > self.max_prompt_tokens:
            return f"prompt: {len(prompt)} tokens, more than the {self.max_prompt_tokens} this server accepts"
        if self.limits.max_tokens is not None and max_tokens > self.limits.max_tokens:
            return f"max_tokens: {max_tokens} is more than the {self.limits.max_tokens} this server allows"
        if len(prompt) + max_tokens > self.context_length:
            return (f"max_tokens: the {len(prompt)}-token prompt plus {max_tokens} new tokens exceeds the model's "
                    f"context of {self.context_length} tokens")
        return None

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the scheduler drops the sequence at its next iteration."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @contextmanager
    def paused(self):
        """Freeze the scheduler between iterations (requests still queue): for tests and inspection."""
        with self._gate:
            yield

    def shutdown(self, deadline_s: float) -> None:
        """Stop taking requests, let in-flight ones finish for up to `deadline_s`, cancel the rest, stop."""
        self.accepting = False
        end = time.perf_counter() + deadline_s
        while (self.waiting or self.active) and time.perf_counter() < end and self._thread.is_alive():
            time.sleep(0.02)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, deadline_s))
        for seq in [*self.waiting, *self.active]:
            self._finish(seq, error=("the server shut down before the request finished", "shutdown"))

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        self._warm_up()
        self.ready.set()
        while not self._stopping:
            with self._gate:
                try:
                    if self.whole_requests:
                        self._serve_whole_request()
                    else:
                        self._admit()
                        if self.active:
                            self._decode_step()
                except Exception as exc:  # a failing step must not kill the scheduler; its requests get the error
                    log.exception("decode step failed")
                    for seq in [*self.active]:
                        self._finish(seq, error=(f"inference failed: {exc}", "internal_error"))
            with self._wake:
                if not self.active and not self.waiting and not self._stopping:
                    self._wake.wait(timeout=0.5)

    def _warm_up(self) -> None:
        """One prefill and two decode steps, so the first request does not pay for lazy initialization."""
        warm = Sequence(self.tokenizer.encode("warm up") or [self.tokenizer.eos_id], Sampling(2), lambda e: None,
                        float("inf"))
        if self.whole_requests:
            self.runner.generate(warm, None)
            return
        first = self.runner.prefill(warm, warm.prompt)
        for _ in range(2):
            first = self.runner.step([warm], [int(first.argmax())])[0]
        self.runner.release(warm)

    def _next_waiting(self) -> Sequence | None:
        """The next queued sequence worth running (cancelled or zero-token ones finish right away), or None."""
        while True:
            with self._wake:
                if not self.waiting:
                    return None
                seq = self.waiting.popleft()
                self.metrics.waiting.set(len(self.waiting))
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.sampling.max_tokens == 0:
                self._finish(seq, "length")
            else:
                return seq

    def _serve_whole_request(self) -> None:
        """Generate the next request whole through the runner's backend, then hand its tokens over one by one
        (with the times they were made) exactly as a decode step would."""
        seq = self._next_waiting()
        if seq is None:
            return
        self.active.append(seq)
        self.metrics.running.set(1)
        self.metrics.prompt_tokens.inc(len(seq.prompt))
        try:
            tokens = self.runner.generate(seq, self.tokenizer.eos_id)
        except Abandoned as why:
            if str(why) == "cancelled":
                self._finish(seq, "cancelled")
            else:
                self._finish(seq, error=(f"the request ran longer than the server's timeout of "
                                         f"{self.limits.timeout_s:g} s", "timeout"))
            return
        self.metrics.occupancy.observe(1)
        for token, made_at in tokens:
            if seq not in self.active:  # ended at end-of-text or a stop string; the backend went on
                break
            self._accept(seq, token, made_at)
        if seq in self.active:  # the backend stopped short of max_tokens (its own context limit)
            self._send(seq, self.tokenizer.decode(seq.tokens))
            self._finish(seq, "length")

    def _admit(self) -> None:
        """Fill free slots from the queue; the sequences that join this iteration are prefilled together."""
        joining = []
        while len(self.active) + len(joining) < self.limits.max_batch and (seq := self._next_waiting()) is not None:
            joining.append(seq)
        if joining:
            logits = self.runner.prefill_many(joining)
            for seq, row in zip(joining, logits):
                self.metrics.prompt_tokens.inc(len(seq.prompt))
                self.active.append(seq)
                self._accept(seq, self._sample(seq, row[None])[0])
        self.metrics.running.set(len(self.active))

    def _decode_step(self) -> None:
        for seq in [s for s in self.active if s.cancelled or time.perf_counter() > s.deadline]:
            self._finish(seq, "cancelled") if seq.cancelled else self._finish(seq, error=(
                f"the request ran longer than the server's timeout of {self.limits.timeout_s:g} s", "timeout"))
        if not self.active:
            return
        batch = list(self.active)
        self.metrics.occupancy.observe(len(batch))
        logits = self.runner.step(batch, [seq.tokens[-1] for seq in batch])
        for seq, row in zip(batch, logits):
            self._accept(seq, self._sample(seq, row[None])[0])

    @staticmethod
    def _sample(seq: Sequence, logits: torch.Tensor) -> int:
        s = seq.sampling
        return [int(t) for t in sample_next(logits, s.temperature, s.top_k, s.top_p, seq.generator)]

    def _accept(self, seq: Sequence, token: int, now: float | None = None) -> None:
        """Take one new token of `seq` (made at `now`, default: just now): send the text it completes, finish
        the sequence if it is done."""
        now = time.perf_counter() if now is None else now
        if token == self.tokenizer.eos_id:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        self.metrics.generation_tokens.inc()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        text = self.tokenizer.decode(seq.tokens)
        stop_at = min((i for i in (text.find(s) for s in seq.sampling.stop) if i >= 0), default=None)
        if stop_at is not None:
            self._send(seq, text[:stop_at])
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.sampling.max_tokens:
            self._send(seq, text)
            self._finish(seq, "length")
        else:
            self._send(seq, text[:_safe_end(text, seq.sampling.stop)])

    def _send(self, seq: Sequence, text: str) -> None:
        if len(text) > seq.emitted:
            seq.sink(Event("text", text[seq.emitted:]))
            seq.emitted = len(text)

    def _finish(self, seq: Sequence, reason: str | None = None, error: tuple[str, str] | None = None) -> None:
        if seq in self.active:
            self.active.remove(seq)
            self.metrics.running.set(len(self.active))
        self.runner.release(seq)
        self.metrics.requests.labels(finish_reason=reason or error[1]).inc()
        if seq.last_token_at is not None:
            self.metrics.e2e.observe(seq.last_token_at - seq.arrived)
        if error is not None:
            seq.sink(Event("error", error[0], code=error[1]))
        else:
            seq.sink(Event("done", finish_reason=reason, prompt_tokens=len(seq.prompt),
                           completion_tokens=len(seq.tokens)))


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of a partial completion can be sent: not a trailing incomplete UTF-8 character (decoded
    as U+FFFD until its last byte arrives), nor a tail that may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:n]):
                end = min(end, len(text[:end]) - n)
                break
    return end
