"""Hook implementations of the kernel plugin (entry-point name `kernel`), one `KernelPlugin` per variant.

on_model_load    tunes the execution strategy for this model shape (or reuses the cached decision)
                 and sets the thread count;
transform_forward runs the training forward under the chosen precision, attention kernel and
                 compilation;
on_train_start   switches AdamW to the fused step when that was chosen;
on_epoch_end     re-times the chosen forward against the plain one and watches the validation
                 loss; if the chosen path got slower or unstable it switches back (recorded);
on_train_end     adds the tuning table to report.md;
on_infer         times the torch inference paths (int8, bf16) against fp32 and generates on the chosen one.

Precision and threads are the `train` section's (`train.precision`, `train.threads`), read by the
trainer and this plugin alike: `auto` / unset lets the kernel choose, a value fixes it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ryzen_core import (Forward, InferencePath, Plugin, PluginSettings, ReportSection, cpu_features, format_ratio,
                        hookimpl, paired_ratios)

from .decision import decide, decide_once
from .denormals import set_flush_denormal_all_threads
from .report import decision_markdown, utilization_line
from .strategy import Strategy, apply_optimizer, apply_threads, plain_strategy, wrap_forward
from .tune import random_batches, vocab_size_of

log = logging.getLogger(__name__)

# Settings that moved to the train section, where the trainer reads them too, with what their values mean now.
MOVED_TO_TRAIN = {"precision": "auto lets the kernel choose where the CPU has native bf16",
                  "threads": "unset lets the kernel choose"}


class KernelSettings(PluginSettings):
    attention: Literal["auto", "default", "math"] = "auto"
    """Scaled-dot-product attention kernel: torch's default (flash) or the math path; 'auto' measures both."""
    optimizer: Literal["auto", "foreach", "fused"] = "auto"
    """AdamW step implementation; 'auto' measures both."""
    compile: Literal["auto", "inductor", "eager"] = "auto"
    """torch.compile of the training forward (falls back to eager if it fails); 'auto' measures it."""
    denormals: Literal["flush", "keep"] = "flush"
    """'flush' sets FTZ/DAZ on every torch worker thread for the optimized run (see denormals.py); not
    tuned, because subnormals appear only as the model trains, after tuning has measured."""
    autotune: bool = True
    """Measure the 'auto' choices; when false they take the reference choice, except precision,
    which under `train.precision: auto` then follows the CPU (bf16 where native)."""
    retune: bool = False
    """Measure again even if a decision for this CPU, model shape and library versions is cached."""
    tune_rounds: int = Field(7, ge=2)
    """Timed rounds per side in each tuning trial."""
    tune_steps: int = Field(2, ge=1)
    """Optimizer steps per round."""
    confirm_cached: bool = True
    """With a cached decision, still time the chosen path against the reference in this run."""
    loss_tolerance: float = Field(0.02, gt=0)
    """A candidate is sound when its loss is within this fraction of the fp32 eager reference's."""
    recheck: bool = True
    """At each evaluation, re-time the chosen forward against the plain one; switch back if it is
    slower at `recheck_patience` evaluations in a row (one busy moment on a shared machine is not enough)."""
    recheck_rounds: int = Field(5, ge=2)
    recheck_patience: int = Field(2, ge=1)
    instability_tolerance: float = Field(0.1, gt=0)
    """Switch back to the plain path if validation loss exceeds its best so far by this fraction."""
    mask_features: list[str] = Field(default_factory=list)
    """Features to treat as absent (to exercise the fallback paths)."""
    inference: Literal["auto", "fp32", "int8", "bf16"] = "auto"
    """torch inference path for validation; 'auto' times int8 dynamic quantization (and bf16 on native
    hardware) against fp32 decoding and keeps the fastest sound one."""
    infer_rounds: int = Field(5, ge=2)
    infer_prompt_tokens: int = Field(32, ge=1)
    infer_new_tokens: int = Field(16, ge=2)
    infer_logits_tolerance: float = Field(0.05, gt=0)
    """Relative L2 error of the logits against fp32 that an inference path may have."""

    @model_validator(mode="before")
    @classmethod
    def _moved_to_train(cls, data: Any) -> Any:
        for key, meaning in MOVED_TO_TRAIN.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"'{key}' moved to train.{key}, which the trainer and the kernel both read "
                                 f"({meaning})")
        return data


@dataclass
class KernelState:
    """What the plugin chose for its variant's model, and what it is running now."""

    decision: dict[str, Any]
    source: str
    chosen: Strategy
    active: Strategy
    plain: Strategy  # the run's plain path: what a switch back goes to, what re-checks time against
    pin: bool  # train.precision is auto: the choice is the kernel's, so its forward states the precision itself
    batch: tuple[torch.Tensor, torch.Tensor]
    inner: Forward | None = None
    plain_forward: Forward | None = None
    forward: Forward | None = None
    optimizer: torch.optim.Optimizer | None = None
    best_val: float = math.inf
    rechecks: list[dict[str, Any]] = field(default_factory=list)
    slower_in_row: int = 0
    reverted: str | None = None
    resumed_on: str | None = None

    def is_plain(self) -> bool:
        return self.active == self.plain.with_knob("threads", self.active.threads)


AUTOTUNE_RECORD = ("chosen", "chosen_description", "not_tried", "trials", "confirmation", "tune_seconds",
                   "cache_file", "created")


def _time_forward_backward(forward: Forward, model: torch.nn.Module, batch) -> float:
    start = time.perf_counter()
    with torch.random.fork_rng():  # dropout here must not shift the training run's random stream
        forward(*batch).loss.backward()
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None  # the trainer zeroes gradients at the start of each step anyway
    return elapsed


class KernelPlugin(Plugin):
    """One per variant: the decision, the forward it wraps and the re-checks live on the instance."""

    Settings = KernelSettings

    def __init__(self, settings: KernelSettings | None = None, context=None):
        super().__init__(settings, context)
        self.state: KernelState | None = None

    @hookimpl
    def register_commands(self, cli):
        from .cli import kernel_group

        cli.add_command(kernel_group)

    @hookimpl
    def on_model_load(self, model, config, record):
        settings = self.settings
        cpu = cpu_features(mask=settings.mask_features)
        record("cpu", model=cpu.model, usable_cores=cpu.usable_cores, physical_cores=cpu.physical_cores,
               native_bf16=cpu.native_bf16, bf16_unit=cpu.bf16_unit,
               features=sorted(k for k, v in cpu.features.items() if v), masked=settings.mask_features)
        record("denormals", **set_flush_denormal_all_threads(settings.denormals == "flush"))
        state = self._new_state(model, config, *decide_once(model, config, settings, cpu))
        apply_threads(state.chosen)
        record("autotune", source=state.source, **{key: state.decision.get(key) for key in AUTOTUNE_RECORD})

    def _new_state(self, model, config, decision: dict[str, Any], source: str) -> KernelState:
        chosen = Strategy(**decision["chosen"])
        batch = random_batches(vocab_size_of(model), config.train.batch_size, config.data.seq_len, count=1, seed=1)[0]
        self.state = KernelState(decision=decision, source=source, chosen=chosen, active=chosen,
                                 plain=plain_strategy(config.train.precision), pin=config.train.precision == "auto",
                                 batch=batch)
        return self.state

    def _state_for(self, model, config) -> KernelState:
        if self.state is None:  # on_model_load did not run for this model (a plugin calling us directly)
            settings = self.settings.model_copy(update={"autotune": False})
            self._new_state(model, config, *decide(model, config, settings, cpu_features(mask=settings.mask_features)))
        return self.state

    @hookimpl
    def transform_forward(self, forward, model, config, record):
        state = self._state_for(model, config)
        state.inner = forward
        state.plain_forward = wrap_forward(forward, state.plain, pin_precision=state.pin)
        if state.active.forward_knobs == state.plain.forward_knobs and not state.pin:
            state.forward = None
            record("forward", strategy=state.active.describe(), note="reference forward kept")
            return None

        def compile_failed(reason: str) -> None:
            record("compile_fallback", reason=reason)
            state.active = state.active.with_knob("compile", "eager")

        state.forward = wrap_forward(forward, state.active, compile_failed, pin_precision=state.pin)
        pinned = {"note": "precision set inside the forward: train.precision is auto, so the kernel owns the "
                          "choice and states it even under an outer autocast"} if state.pin else {}
        record("forward", strategy=state.active.describe(), **pinned)

        def kernel_forward(input_ids, targets):
            return state.forward(input_ids, targets)  # a switch back replaces state.forward

        return kernel_forward

    @hookimpl
    def on_train_start(self, model, optimizer, config, record):
        state = self._state_for(model, config)
        state.optimizer = optimizer
        apply_optimizer(optimizer, state.active)
        record("optimizer", step=state.active.optimizer)

    def _revert(self, reason: str, record, optimizer_too: bool) -> None:
        state = self.state
        state.reverted = reason
        state.forward = state.plain_forward
        state.active = state.plain.with_knob("threads", state.active.threads).with_knob(
            "optimizer", state.plain.optimizer if optimizer_too else state.active.optimizer)
        if optimizer_too and state.optimizer is not None:
            apply_optimizer(state.optimizer, state.active)
        record("reverted", reason=reason, now=state.active.describe())

    @hookimpl
    def on_epoch_end(self, epoch, metrics, model, record):
        """Switches back are the plugin's own state, not settings: recorded as `reverted` events and in
        report.md, so nothing is returned."""
        settings, state = self.settings, self.state
        if state is None or state.reverted or state.is_plain():
            return None
        val_loss = metrics.get("val_loss")
        limit = state.best_val * (1 + settings.instability_tolerance)
        if val_loss is None or not math.isfinite(val_loss) or val_loss > limit:
            self._revert(f"validation loss {val_loss} after best {state.best_val:.4f}: unstable", record,
                         optimizer_too=True)
            return None
        state.best_val = min(state.best_val, val_loss)
        if not settings.recheck or state.forward is None or state.active.forward_knobs == state.plain.forward_knobs:
            return None
        comparison = paired_ratios(lambda: _time_forward_backward(state.plain_forward, model, state.batch),
                                   lambda: _time_forward_backward(state.forward, model, state.batch),
                                   warmup=1, repeats=settings.recheck_rounds, higher_is_better=False)
        check = {"epoch": epoch, "speedup": comparison.median_ratio, "median_ratio": comparison.median_ratio,
                 "ci_low": comparison.ci_low, "ci_high": comparison.ci_high, "verdict": comparison.verdict}
        state.rechecks.append(check)
        record("recheck", **check)
        state.slower_in_row = state.slower_in_row + 1 if comparison.verdict == "slower" else 0
        if state.slower_in_row >= settings.recheck_patience:
            self._revert(f"re-checks at {state.slower_in_row} evaluations in a row found the chosen forward slower, "
                         f"last {format_ratio(comparison)} the plain one", record, optimizer_too=False)
        return None

    @hookimpl
    def on_train_end(self, model, config, record):
        if self.settings.denormals == "flush":  # runs after this one (the next variant) start as usual
            record("denormals", **set_flush_denormal_all_threads(False))
        state = self.state
        if state is None:
            return None
        text = decision_markdown(state.decision, state.source, state)
        confirmation = state.decision.get("confirmation") or {}
        if hasattr(model, "flops_per_token") and confirmation.get("tokens_per_s_candidate"):
            text += "\n" + utilization_line(confirmation["tokens_per_s_candidate"] * model.flops_per_token(), config,
                                            record)
        return ReportSection(text)

    @hookimpl
    def on_infer(self, generate, model, record):
        from .inference import build_path, tune_inference

        settings = self.settings
        if settings.inference == "fp32":
            return None
        if settings.inference == "auto":
            candidates = ["int8"] + (["bf16"] if cpu_features(mask=settings.mask_features).native_bf16 else [])
            result = tune_inference(model, candidates, settings, vocab_size_of(model), log.info)
            record("inference", **result)
            chosen = result["chosen"]
        else:
            chosen = settings.inference
            record("inference", chosen=chosen, trials=[], note="set in config")
        if chosen == "fp32":
            return None
        path = build_path(chosen, model)
        # Generation runs on the chosen path's model, so a plugin that wraps generation should come after
        # kernel; the validator's perplexity is measured on the same path's logits.
        return InferencePath(path.generate, logits=path.logits)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.state
        if state is None:
            return {}
        return {"chosen": state.chosen.as_dict(), "active": state.active.as_dict(), "reverted": state.reverted,
                "best_val": state.best_val if math.isfinite(state.best_val) else None,
                "rechecks": state.rechecks, "slower_in_row": state.slower_in_row}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Training goes on with the path the checkpoint was trained on (the trainer folds the forward
        again afterwards). A validation worker restores onto an instance that trained nothing: no-op."""
        state = self.state
        if state is None or not saved:
            return
        chosen = Strategy(**saved["chosen"])
        if chosen != state.chosen:
            state.resumed_on = chosen.describe()
        state.chosen, state.active = chosen, Strategy(**saved["active"])
        state.reverted, state.rechecks = saved["reverted"], saved["rechecks"]
        state.slower_in_row = saved["slower_in_row"]
        state.best_val = math.inf if saved["best_val"] is None else saved["best_val"]
        apply_threads(state.active)
        if state.optimizer is not None:
            apply_optimizer(state.optimizer, state.active)
