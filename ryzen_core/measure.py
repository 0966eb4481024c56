"""How Ryzen compares two things it times: paired, interleaved rounds and a verdict from a
confidence interval of the median per-round ratio. Every speed figure Ryzen prints (inference
validation, `ryzen bench train`, plugin tuners and benchmarks) goes through this module.

- **Same run, interleaved.** A and B are measured in the same process, alternating A B A B ...
  after untimed warm-up rounds, so drift of the machine (turbo, thermal state, other load) hits
  both sides of a pair alike.
- **Ratios, not absolutes.** Each round gives one ratio oriented so that > 1 means B is better:
  B/A for rates (tokens/s), A/B for durations (seconds). The headline is the median of the
  per-round ratios.
- **Interval.** A 95% percentile bootstrap interval of that median (2000 resamples of the
  rounds with a fixed seed, so the same rounds always give the same interval).
- **Verdict.** "faster" or "slower" only when the interval excludes 1; otherwise "no measurable
  difference". One round has no interval and never gets a verdict. With few rounds the
  interval is about the range of the ratios, so a verdict needs every round to agree; that
  happens by chance with probability 2^-n per side (3% at the 5 rounds most defaults start from).
- **Enough rounds.** `measure_until_narrow` adds rounds, up to a cap, until every interval's
  half-width is at most `target` of its median.
- **Busy machine.** The load average against the usable cores, and each side's coefficient of
  variation over the rounds, are recorded; `conditions` flags a run where the load exceeded the
  cores or a CV exceeded `BUSY_CV`, so a report can say "rerun on a quieter machine".

The interquartile range of the ratios (p25, p75) and their min and max are kept as a
description of the rounds; they decide nothing.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
TARGET_HALF_WIDTH = 0.05
"""Adaptive rounds stop once the interval's half-width is at most this fraction of the median."""
BUSY_CV = 0.10
"""A side whose rounds vary by more than this (std / mean) was measured on a busy machine."""

INTERVAL_DEFINITION = (f"{CI_LEVEL:.0%} percentile bootstrap interval of the median per-round ratio "
                       f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})")
VERDICT_RULE = ("'faster'/'slower' (or the metric's own words) only when the interval excludes 1, "
                "else 'no measurable difference'; a single round gets no verdict")
NO_DIFFERENCE = "no measurable difference"


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """n, mean, p50, p90, p99, std (sample, ddof=1; 0 for one value), min and max of `values`."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("summarize needs at least one value")
    p50, p90, p99 = (float(v) for v in np.percentile(data, [50, 90, 99]))
    return {"n": int(data.size), "mean": float(data.mean()), "p50": p50, "p90": p90, "p99": p99,
            "std": float(data.std(ddof=1)) if data.size > 1 else 0.0, "min": float(data.min()),
            "max": float(data.max())}


def median_interval(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of `values`."""
    return _bootstrap(values, np.median, level, resamples, seed)


def mean_interval(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-batch loss differences)."""
    return _bootstrap(values, np.mean, level, resamples, seed)


def _bootstrap(values: Sequence[float], statistic, level: float, resamples: int, seed: int) -> tuple[float, float]:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("an interval needs at least one value")
    picks = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    estimates = statistic(data[picks], axis=1)
    low, high = np.percentile(estimates, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def coefficient_of_variation(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / values.mean()) if values.size > 1 else 0.0


@dataclass
class PairedComparison:
    """Candidate (B) vs baseline (A) from interleaved measurements; ratio > 1 means B is better."""

    higher_is_better: bool
    median_ratio: float
    ci_low: float
    ci_high: float
    ci_level: float
    verdict: str
    n: int
    p25: float
    p75: float
    spread: float
    min: float
    max: float
    cv_a: float
    cv_b: float
    ratios: list[float]
    values_a: list[float]
    values_b: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return format_ratio(self)


def compare_pairs(values_a: Sequence[float], values_b: Sequence[float], higher_is_better: bool,
                  better: str = "faster", worse: str = "slower") -> PairedComparison:
    """Ratios of measurements taken in pairs (values_a[i] next to values_b[i]); see the module docstring."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.size == 0 or a.shape != b.shape:
        raise ValueError(f"need the same non-zero number of A and B measurements, got {a.size} and {b.size}")
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("measurements must be positive to form ratios")
    ratios = b / a if higher_is_better else a / b
    median, p25, p75 = (float(v) for v in np.percentile(ratios, [50, 25, 75]))
    low, high = median_interval(ratios)
    if ratios.size < 2 or low <= 1.0 <= high:
        verdict = NO_DIFFERENCE
    else:
        verdict = better if low > 1.0 else worse
    return PairedComparison(higher_is_better=higher_is_better, median_ratio=median, ci_low=low, ci_high=high,
                            ci_level=CI_LEVEL, verdict=verdict, n=int(ratios.size), p25=p25, p75=p75,
                            spread=p75 - p25, min=float(ratios.min()), max=float(ratios.max()),
                            cv_a=coefficient_of_variation(a), cv_b=coefficient_of_variation(b),
                            ratios=ratios.tolist(), values_a=a.tolist(), values_b=b.tolist())


def format_ratio(comparison: PairedComparison | Mapping[str, Any], digits: int = 2) -> str:
    """'1.38x [1.31, 1.44]': the median ratio and its interval, from a comparison or its dict."""
    c = comparison.to_dict() if isinstance(comparison, PairedComparison) else comparison
    return f"{c['median_ratio']:.{digits}f}x [{c['ci_low']:.{digits}f}, {c['ci_high']:.{digits}f}]"


def relative_half_width(comparison: PairedComparison) -> float:
    return (comparison.ci_high - comparison.ci_low) / 2 / comparison.median_ratio


def measure_until_narrow(one_round: Callable[[], None], comparisons: Callable[[], Iterable[PairedComparison]],
                         min_rounds: int, max_rounds: int, target: float = TARGET_HALF_WIDTH) -> dict[str, Any]:
    """Run `one_round` `min_rounds` times, then more, up to `max_rounds`, until every comparison's
    interval half-width is at most `target` of its median. Returns how many rounds ran and why it stopped."""
    if min_rounds < 1:
        raise ValueError(f"at least one round is needed, got {min_rounds}")
    rounds = 0
    while True:
        one_round()
        rounds += 1
        if rounds < min_rounds:
            continue
        widest = max((relative_half_width(c) for c in comparisons()), default=0.0)
        if widest <= target or rounds >= max_rounds:
            return {"rounds": rounds, "min_rounds": min_rounds, "max_rounds": max(max_rounds, min_rounds),
                    "target_half_width": target, "widest_half_width": widest, "narrow_enough": widest <= target}


def paired_ratios(run_a: Callable[[], float], run_b: Callable[[], float], warmup: int, repeats: int,
                  higher_is_better: bool, better: str = "faster", worse: str = "slower",
                  max_repeats: int | None = None, target_half_width: float = TARGET_HALF_WIDTH) -> PairedComparison:
    """Measure A and B interleaved (A B A B ...): `warmup` untimed pairs, then at least `repeats` pairs,
    more (up to `max_repeats`) while the interval is wider than `target_half_width`.

    Each callable performs one measurement and returns its value (tokens/s, seconds, ...).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        run_a()
        run_b()
    values_a: list[float] = []
    values_b: list[float] = []

    def one_round() -> None:
        values_a.append(run_a())
        values_b.append(run_b())

    def compared() -> PairedComparison:
        return compare_pairs(values_a, values_b, higher_is_better, better, worse)

    measure_until_narrow(one_round, lambda: [compared()], repeats, max_repeats or repeats, target_half_width)
    return compared()


# ----------------------------------------------------------------------------- was the machine busy?


def load_snapshot() -> dict[str, Any]:
    """1-minute load average and the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_1m": load, "usable_cores": cores}


def conditions(loads: Sequence[Mapping[str, Any]], comparisons: Iterable[Mapping[str, Any] | PairedComparison]
               ) -> dict[str, Any]:
    """Whether the machine was busy while `comparisons` were measured, from load snapshots taken
    around them and the coefficient of variation of each side's rounds."""
    dicts = [c.to_dict() if isinstance(c, PairedComparison) else c for c in comparisons]
    known = [snap["load_1m"] for snap in loads if snap.get("load_1m") is not None]
    load = max(known) if known else None
    cores = loads[0]["usable_cores"] if loads else load_snapshot()["usable_cores"]
    cv = max((max(c.get("cv_a", 0.0), c.get("cv_b", 0.0)) for c in dicts), default=0.0)
    reasons = []
    if load is not None and load > cores:
        reasons.append(f"load average {load:.2f} above the {cores} usable cores")
    if cv > BUSY_CV:
        reasons.append(f"timed rounds varied by up to {cv:.0%} (coefficient of variation above {BUSY_CV:.0%})")
    return {"load_1m_max": load, "usable_cores": cores, "max_cv": cv, "cv_threshold": BUSY_CV,
            "busy": bool(reasons), "reasons": reasons}


def busy_warning(condition: Mapping[str, Any] | None) -> str | None:
    """One Markdown line for a report when the machine was busy, else None."""
    if not condition or not condition.get("busy"):
        return None
    return (f"> **The machine was busy while timing** ({'; '.join(condition['reasons'])}): intervals are wider "
            "and verdicts less certain than on a quiet machine. Rerun there to confirm.")
