"""Measuring one backend: timing one generation, peak memory, perplexity and greedy agreement.

Timing uses time.perf_counter around greedy generation with eos disabled, so every run
decodes exactly the same number of tokens; Python's garbage collector is paused during a
timed run (as `timeit` does). Time to first token is the time from the call to the
backend's `on_token(0)` (prefill plus the first sampling); decode figures cover the tokens
after it. Peak memory is sampled, never estimated: a thread polls the process RSS every
few milliseconds. The validator (which compares backends) and the worker processes (where a
backend runs while measured) both use these.
"""
from __future__ import annotations

import gc
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .backends import Backend

MIB = 1024 * 1024
RSS_POLL_S = 0.002


# ----------------------------------------------------------------------------- timing one generation


@dataclass
class GenerationTiming:
    """One greedy generation of `new_tokens` tokens for a [batch_size, prompt_len] prompt."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft_s: float
    """Call to on_token(0): prefill plus the first token."""
    decode_step_s: list[float]
    """Time between successive tokens, new_tokens - 1 values."""
    decode_s: float
    total_s: float
    output_ids: torch.Tensor = field(repr=False)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_len / self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * (self.new_tokens - 1) / self.decode_s


def time_generation(backend: Backend, input_ids: torch.Tensor, new_tokens: int) -> GenerationTiming:
    """Time one greedy generation (eos disabled, so exactly `new_tokens` tokens) through `on_token` stamps."""
    if new_tokens < 2:
        raise ValueError(f"timing needs new_tokens >= 2 (one prefill token and at least one decoded), got {new_tokens}")
    stamps: list[float] = []
    steps: list[int] = []

    def on_token(step: int) -> None:
        stamps.append(time.perf_counter())
        steps.append(step)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one run and not the other would be noise, not a difference
    try:
        start = time.perf_counter()
        output = backend.generate(input_ids, new_tokens, temperature=0.0, eos_token_id=None, on_token=on_token)
        end = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    batch, prompt_len = input_ids.shape
    if steps != list(range(new_tokens)):
        raise RuntimeError(f"backend {backend.name!r} called on_token with steps {steps}, "
                           f"expected 0..{new_tokens - 1}: it cannot be timed per token")
    if tuple(output.shape) != (batch, prompt_len + new_tokens):
        raise RuntimeError(f"backend {backend.name!r} returned shape {tuple(output.shape)}, "
                           f"expected {(batch, prompt_len + new_tokens)}")
    return GenerationTiming(batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                            ttft_s=stamps[0] - start, decode_step_s=np.diff(stamps).tolist(),
                            decode_s=stamps[-1] - stamps[0], total_s=end - start, output_ids=output)


# ----------------------------------------------------------------------------- memory


class PeakRssSampler:
    """Peak resident memory (MiB) of this process while the block runs, polled by a background thread.

    `baseline_mb` is the RSS at entry and `peak_mb` the highest RSS seen until exit. RSS is
    process-wide: it counts everything loaded, and a spike shorter than `interval_s` can be missed.
    """

    def __init__(self, interval_s: float = RSS_POLL_S):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self.baseline_mb = self.peak_mb = 0.0
        self.samples = 0

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / MIB)
        self.samples += 1

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRssSampler":
        self.baseline_mb = self.peak_mb = self._process.memory_info().rss / MIB
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="peak-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.baseline_mb


def current_rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def process_peak_rss_mib() -> float:
    """This process's peak resident set (MiB) since it started or since `reset_process_peak_rss`.

    The kernel's VmHWM, not getrusage's ru_maxrss: a process started by exec inherits its
    parent's high-water mark in ru_maxrss, which also cannot be reset. ru_maxrss only where
    /proc is absent.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MIB if sys.platform == "darwin" else 1024)


def reset_process_peak_rss() -> bool:
    """Start a new peak from the current RSS (Linux: '5' into /proc/self/clear_refs); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- quality


def perplexity(backend: Backend, packed_split: torch.Tensor, batch_size: int, max_batches: int) -> float:
    """exp(mean next-token cross entropy) over the first `max_batches` batches of a packed split [N, seq_len+1]."""
    rows = packed_split[: batch_size * max_batches]
    if len(rows) == 0:
        raise ValueError("perplexity needs at least one row")
    total_nats, total_tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i: i + batch_size]
        logits = backend.logits(batch[:, :-1])
        targets = batch[:, 1:]
        total_nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                                      reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(min(total_nats / total_tokens, 700.0))  # 700 keeps exp finite for a broken backend


def agreement(reference_ids: torch.Tensor, other_ids: torch.Tensor, prompt_len: int) -> dict[str, float | int]:
    """Position-wise agreement of the generated parts (after `prompt_len`) of two [B, T] outputs."""
    if reference_ids.shape != other_ids.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference_ids.shape)} vs {tuple(other_ids.shape)}")
    same = reference_ids[:, prompt_len:] == other_ids[:, prompt_len:]
    return {"token_agreement": float(same.float().mean()), "sequence_agreement": float(same.all(dim=1).float().mean()),
            "tokens": int(same.numel()), "sequences": int(same.shape[0])}


def greedy_agreement(reference: Backend, other: Backend, prompts: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """How often `other` generates the same greedy tokens as `reference` (eos disabled)."""
    outputs = [b.generate(prompts, new_tokens, temperature=0.0, eos_token_id=None) for b in (reference, other)]
    return agreement(*outputs, prompt_len=prompts.shape[1])
