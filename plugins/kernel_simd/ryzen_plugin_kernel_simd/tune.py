"""Autotuning: measure each execution choice on the actual model shape and keep what is faster and sound.

The search is greedy, one knob at a time (precision, attention kernel, optimizer step,
compilation, threads), because the knobs are nearly independent and a full product would
cost minutes of compilation. Each trial trains two private copies of the model from the same
initial weights on the same batches: the current best strategy (A) and the same strategy with
one knob turned (B), interleaved A B A B, compared as `ryzen_core.measure` compares: at least
`tune_rounds` rounds, more (up to twice as many) while the 95% interval of the median speed
ratio is wider than +-5%. A knob is kept when

- B is faster: the interval lies wholly above 1 (the verdict "faster"). A gain the interval
  cannot separate from 1 is not kept: keeping it would be a coin toss. The final
  confirmation against the reference uses the same verdict, and the choice falls back to what
  the settings fixed (the reference, by default) if that says slower. And
- B is sound: its loss at the initial weights, and the fp32 loss of its weights after the
  trial's steps, are within `loss_tolerance` (relative) of the fp32 eager reference.

A knob whose trial raises (a compiler that is missing or fails, an unsupported fused step) is
recorded with the error and not kept. At the end the chosen strategy is timed once more
against the reference, so the reported speedup is one paired measurement, not a product.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from ryzen_core import (CpuFeatures, build_optimizer, conditions, describe_error, format_ratio, load_snapshot,
                        paired_ratios, reference_forward)

from .strategy import REFERENCE, Strategy, apply_optimizer, forward_context, wrap_forward

log = logging.getLogger(__name__)

# Knob order matters for a greedy search: precision decides which attention kernel and
# optimizer step are fastest, so it goes first; threads last, as they interact with all.
KNOBS: dict[str, Any] = {"precision": "bf16", "attention": "math", "optimizer": "fused", "compile": "inductor"}
DECISION_RULE = "kept when the 95% bootstrap interval of the median speed ratio excludes 1, and sound"
MAX_ROUNDS_FACTOR = 2


def plan(settings, cpu: CpuFeatures, train) -> tuple[Strategy, list[tuple[str, Any]], dict[str, str]]:
    """The starting strategy (fixed choices applied), the knob trials in order, and why each knob that
    is not tried is not. Precision and threads belong to the `train` section (one owner for the trainer
    and the kernel): `train.precision` auto lets the kernel choose, `train.threads` unset lets it tune."""
    start, trials, not_tried = REFERENCE, [], {}
    for knob, candidate in KNOBS.items():
        wanted, where = (train.precision, "train.precision") if knob == "precision" else (getattr(settings, knob),
                                                                                         f"kernel.{knob}")
        if wanted != "auto":
            start = start.with_knob(knob, wanted)
            not_tried[knob] = f"{wanted} set in {where}"
        elif knob == "precision" and not cpu.native_bf16:
            not_tried[knob] = ("fp32: the CPU has no native bf16 (no AVX-512 BF16 or AMX), so bf16 would be "
                               "emulated and slower")
        else:
            trials.append((knob, candidate))
    usable = cpu.usable_cores
    if train.threads:
        start = start.with_knob("threads", train.threads)
        not_tried["threads"] = f"{train.threads} set in train.threads"
    else:
        start = start.with_knob("threads", usable)
        if cpu.physical_cores and cpu.physical_cores < usable:
            trials.append(("threads", cpu.physical_cores))
        else:
            not_tried["threads"] = f"{usable}: one per usable core, no SMT siblings to leave idle"
    return start, trials, not_tried


def random_batches(vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (count, batch_size, seq_len + 1), generator=gen)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def vocab_size_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    return int(model.get_input_embeddings().num_embeddings)


class TrialModel:
    """A private copy of the model and its optimizer, trained under one strategy."""

    def __init__(self, model: torch.nn.Module, train_config, strategy: Strategy, batches, threads: int):
        self.strategy, self.batches, self.index = strategy, batches, 0
        self.threads = strategy.threads or threads
        self.model = copy.deepcopy(model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, train_config)
        apply_optimizer(self.optimizer, strategy)
        self.reference = reference_forward(self.model)
        self.forward = wrap_forward(self.reference, strategy)  # compile failures raise here: the trial fails
        self.grad_clip = train_config.grad_clip

    def run_steps(self, steps: int) -> float:
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        for _ in range(steps):
            x, y = self.batches[self.index % len(self.batches)]
            self.index += 1
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.forward(x, y).loss
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        return time.perf_counter() - start

    @torch.no_grad()
    def loss(self, held, under_strategy: bool = False) -> float:
        """Loss on the held-out batch: fp32 eager, or through this strategy's own forward."""
        self.model.eval()
        try:
            if under_strategy:
                with forward_context(self.strategy):
                    return float(self.forward(*held).loss)
            return float(self.reference(*held).loss)
        finally:
            self.model.train()


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12) if math.isfinite(value) else math.inf


class Tuner:
    def __init__(self, model: torch.nn.Module, train_config, batch_size: int, seq_len: int, settings,
                 log_line: Callable[[str], None] = log.info):
        self.model, self.train_config, self.settings, self.log_line = model, train_config, settings, log_line
        self.rounds, self.steps = settings.tune_rounds, settings.tune_steps
        # Random tokens are unlearnable in general, but a batch the trial trains on is not: its loss
        # falls as the copies train, so comparing it after the trial checks the whole step.
        self.batches = random_batches(vocab_size_of(model), batch_size, seq_len, count=8)
        self.held = self.batches[0]
        self.tokens_per_measurement = self.steps * batch_size * seq_len
        self.threads = torch.get_num_threads()
        self._reference_losses: dict[int, float] = {}

    def reference_loss(self, steps: int) -> float:
        """fp32 eager loss on the held batch after `steps` reference training steps from the initial weights."""
        if steps not in self._reference_losses:
            ref = TrialModel(self.model, self.train_config, REFERENCE, self.batches, self.threads)
            ref.run_steps(steps)
            self._reference_losses[steps] = ref.loss(self.held)
        return self._reference_losses[steps]

    def trial(self, a: Strategy, b: Strategy) -> dict[str, Any]:
        record: dict[str, Any] = {"baseline": a.describe(), "candidate": b.describe(),
                                  "candidate_strategy": b.as_dict(), "error": None}
        try:
            side_a = TrialModel(self.model, self.train_config, a, self.batches, self.threads)
            side_b = TrialModel(self.model, self.train_config, b, self.batches, self.threads)
            loss_initial = side_b.loss(self.held, under_strategy=True)

            def rate(side: TrialModel) -> Callable[[], float]:
                return lambda: self.tokens_per_measurement / side.run_steps(self.steps)

            comparison = paired_ratios(rate(side_a), rate(side_b), warmup=1, repeats=self.rounds,
                                       higher_is_better=True, max_repeats=MAX_ROUNDS_FACTOR * self.rounds)
            loss_after = side_b.loss(self.held)
        except Exception as exc:
            record.update(error=describe_error(exc), sound=False, accepted=False)
            return record
        finally:
            torch.set_num_threads(self.threads)
        drift = max(relative_difference(loss_initial, self.reference_loss(0)),
                    relative_difference(loss_after, self.reference_loss(side_b.index)))
        sound = drift <= self.settings.loss_tolerance
        record.update(
            tokens_per_s_baseline=statistics.median(comparison.values_a),
            tokens_per_s_candidate=statistics.median(comparison.values_b),
            speedup=comparison.to_dict(), loss_initial=loss_initial, loss_after=loss_after,
            loss_relative_difference=drift, sound=sound, accepted=sound and comparison.verdict == "faster")
        return record

    def run(self, start: Strategy, trials: list[tuple[str, Any]]) -> dict[str, Any]:
        began, loads = time.perf_counter(), [load_snapshot()]
        best, records = start, []
        for knob, value in trials:
            candidate = best.with_knob(knob, value)
            record = dict(self.trial(best, candidate), knob=knob, value=value)
            records.append(record)
            self.log_line(f"kernel tune: {knob}={value}: {describe_trial(record)}")
            if record["accepted"]:
                best = candidate
        confirmation = None
        if best != REFERENCE:
            confirmation = self.trial(REFERENCE, best)
            self.log_line(f"kernel tune: chosen ({best.describe()}) vs reference: {describe_trial(confirmation)}")
            failed = confirmation["error"] or not confirmation["sound"] or confirmation["speedup"]["verdict"] == "slower"
            if failed and best != start:  # back to what the settings fixed; the user asked for that
                why = confirmation["error"] or ("not sound" if not confirmation["sound"] else "slower")
                self.log_line(f"kernel tune: keeping {start.describe()}; the tuned combination was {why}")
                confirmation["fell_back"] = why
                best = start
        loads.append(load_snapshot())
        timed = [r["speedup"] for r in [*records, confirmation or {}] if r.get("speedup")]
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rounds": self.rounds, "max_rounds": MAX_ROUNDS_FACTOR * self.rounds, "decision_rule": DECISION_RULE,
            "steps_per_round": self.steps,
            "tokens_per_measurement": self.tokens_per_measurement,
            "loss_tolerance": self.settings.loss_tolerance,
            "reference_loss": {f"after_{steps}_steps": loss for steps, loss in sorted(self._reference_losses.items())},
            "start": start.as_dict(), "trials": records, "chosen": best.as_dict(), "chosen_description": best.describe(),
            "confirmation": confirmation, "tune_seconds": round(time.perf_counter() - began, 2),
            "conditions": conditions(loads, timed),
        }


def describe_trial(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"failed ({record['error']})"
    s = record["speedup"]
    verdict = "kept" if record.get("accepted") else "not kept"
    return (f"{format_ratio(s)} {s['verdict']} ({s['n']} rounds), loss within "
            f"{record['loss_relative_difference']:.2%} of fp32 ({'sound' if record['sound'] else 'NOT sound'}); "
            f"{verdict}")
