"""Training execution strategies: the knobs the autotuner turns, and how a chosen strategy is applied.

A strategy is a handful of independent choices, each of which a library already implements
well; the plugin only picks among them by measurement:

- precision: fp32, or bf16 autocast (oneDNN uses AVX-512 BF16 / AMX for the matmuls);
- attention: torch's default scaled-dot-product kernel (flash attention on CPU) or the math
  path (plain matmul + softmax, which under bf16 goes through the same AMX matmuls and whose
  backward is much cheaper at short sequence lengths);
- optimizer: AdamW's multi-tensor `foreach` step or the single fused kernel;
- compile: eager or `torch.compile` (inductor), which falls back to eager if it fails;
- threads: intra-op threads, all usable cores or one per physical core.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from ryzen_core import Forward, describe_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strategy:
    precision: str = "fp32"  # "fp32" | "bf16"
    attention: str = "default"  # "default" | "math"
    optimizer: str = "foreach"  # "foreach" | "fused"
    compile: str = "eager"  # "eager" | "inductor"
    threads: int | None = None  # None: leave torch's setting alone

    def with_knob(self, knob: str, value: Any) -> "Strategy":
        return replace(self, **{knob: value})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [self.precision, f"{self.attention} attention", f"{self.optimizer} AdamW",
                 "torch.compile" if self.compile == "inductor" else "eager"]
        if self.threads:
            parts.append(f"{self.threads} threads")
        return ", ".join(parts)

    @property
    def forward_knobs(self) -> tuple[str, str, str]:
        return self.precision, self.attention, self.compile


REFERENCE = Strategy()


def plain_strategy(train_precision: str) -> Strategy:
    """The plain path of a run: the reference knobs in the precision `train.precision` fixes (bf16 when
    it says bf16: the trainer autocasts then, whatever the kernel does), fp32 otherwise."""
    return REFERENCE.with_knob("precision", "bf16") if train_precision == "bf16" else REFERENCE


def forward_context(strategy: Strategy, pin_precision: bool = False) -> contextlib.ExitStack:
    """The autocast and attention-kernel contexts a strategy's forward runs in (backward follows them).
    `pin_precision` also turns autocast off for an fp32 strategy, so an outer autocast (the trainer's,
    under `train.precision: auto`) cannot run the forward in another precision than the one chosen."""
    stack = contextlib.ExitStack()
    if strategy.precision == "bf16":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    elif pin_precision:
        stack.enter_context(torch.autocast("cpu", enabled=False))
    if strategy.attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


class CompiledForward:
    """`torch.compile(forward)` that, when compiling or running the compiled graph fails, says why
    once (`on_failure`) and runs eager from then on. An error the eager forward raises as well is
    not the compiler's fault and propagates unchanged."""

    def __init__(self, forward: Forward, on_failure: Callable[[str], None]):
        self.eager, self.on_failure, self.failure = forward, on_failure, None
        try:
            self.compiled = torch.compile(forward)
        except Exception as exc:  # e.g. a Python version dynamo does not support
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failure = describe_error(exc)
        log.warning("torch.compile failed, running eager: %s", self.failure)
        self.on_failure(self.failure)

    def __call__(self, input_ids, targets):
        if self.failure is None:
            try:
                return self.compiled(input_ids, targets)
            except Exception as exc:
                out = self.eager(input_ids, targets)  # raises too if the error is not the compiler's
                self._fail(exc)
                return out
        return self.eager(input_ids, targets)


def strict_compile_failure(reason: str) -> None:
    raise RuntimeError(f"torch.compile failed: {reason}")


def wrap_forward(forward: Forward, strategy: Strategy,
                 on_compile_failure: Callable[[str], None] = strict_compile_failure,
                 pin_precision: bool = False) -> Forward:
    """`forward` run under the strategy's precision, attention kernel and compilation (see
    forward_context for `pin_precision`)."""
    if strategy.forward_knobs == REFERENCE.forward_knobs and not pin_precision:
        return forward
    inner = CompiledForward(forward, on_compile_failure) if strategy.compile == "inductor" else forward

    def strategy_forward(input_ids, targets):
        with forward_context(strategy, pin_precision):
            return inner(input_ids, targets)

    return strategy_forward


def apply_optimizer(optimizer: torch.optim.Optimizer, strategy: Strategy) -> None:
    """Switch AdamW between its foreach and fused step; both read the flag from each param group."""
    fused = strategy.optimizer == "fused"
    for group in optimizer.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = False


def apply_threads(strategy: Strategy) -> None:
    if strategy.threads:
        torch.set_num_threads(strategy.threads)
