"""Inference validation: speed, memory and quality of inference backends, measured in one run.

The method (every performance figure Ryzen prints follows it):

- **Same run, interleaved.** Baseline and candidate are measured in the same process,
  alternating A B A B ... (with several candidates, baseline then each candidate, round
  after round), after `warmup` untimed rounds. Drift of the machine (turbo, thermal state,
  other load) then hits both sides of a pair alike.
- **Ratios, not absolutes.** Each round gives one ratio candidate vs baseline, oriented so
  that a ratio > 1 means the candidate is better: candidate/baseline for rates (tokens/s),
  baseline/candidate for durations (time to first token). The headline is the median of
  those per-round ratios.
- **Spread.** The spread is the interquartile range of the per-round ratios, p75 - p25
  (numpy's linear-interpolated percentiles); min and max are reported beside it and the
  raw per-round values are kept.
- **Verdict.** A difference |median ratio - 1| no larger than the spread is reported as
  "no measurable difference"; otherwise the candidate is "faster" or "slower".

Timing uses time.perf_counter around greedy generation with eos disabled, so every run
decodes exactly the same number of tokens; Python's garbage collector is paused during a
timed run (as `timeit` does). Time to first token is the time from the call to the
backend's `on_token(0)` (prefill plus the first sampling); decode figures cover the tokens
after it. Peak memory is sampled, never estimated: a thread polls the process RSS every
few milliseconds.
"""
from __future__ import annotations

import gc
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .backends import Backend
from .config import ValidateConfig

MIB = 1024 * 1024
RSS_POLL_S = 0.002
SPREAD_DEFINITION = ("interquartile range of the per-round ratios, p75 - p25 (numpy linear-interpolated "
                     "percentiles); min and max are reported as well")
VERDICT_RULE = "'no measurable difference' when |median ratio - 1| <= spread, else the better or worse word"


# ----------------------------------------------------------------------------- statistics


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """n, mean, p50, p90, p99, std (sample, ddof=1; 0 for one value), min and max of `values`."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("summarize needs at least one value")
    return {
        "n": int(data.size),
        "mean": float(data.mean()),
        "p50": _percentile(data, 50),
        "p90": _percentile(data, 90),
        "p99": _percentile(data, 99),
        "std": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "min": float(data.min()),
        "max": float(data.max()),
    }


@dataclass
class PairedComparison:
    """Candidate (B) vs baseline (A) from interleaved measurements; ratio > 1 means B is better."""

    higher_is_better: bool
    median_ratio: float
    p25: float
    p75: float
    spread: float
    min: float
    max: float
    n: int
    verdict: str
    ratios: list[float]
    values_a: list[float]
    values_b: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    median, p25, p75 = (_percentile(ratios, q) for q in (50, 25, 75))
    spread = p75 - p25
    if abs(median - 1.0) <= spread:
        verdict = "no measurable difference"
    else:
        verdict = better if median > 1.0 else worse
    return PairedComparison(higher_is_better=higher_is_better, median_ratio=median, p25=p25, p75=p75,
                            spread=spread, min=float(ratios.min()), max=float(ratios.max()), n=int(ratios.size),
                            verdict=verdict, ratios=ratios.tolist(), values_a=a.tolist(), values_b=b.tolist())


def paired_ratios(run_a: Callable[[], float], run_b: Callable[[], float], warmup: int, repeats: int,
                  higher_is_better: bool, better: str = "faster", worse: str = "slower") -> PairedComparison:
    """Measure A and B interleaved (A B A B ...): `warmup` untimed pairs, then `repeats` pairs compared.

    Each callable performs one measurement and returns its value (tokens/s, seconds, ...).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        run_a()
        run_b()
    values_a, values_b = [], []
    for _ in range(repeats):
        values_a.append(run_a())
        values_b.append(run_b())
    return compare_pairs(values_a, values_b, higher_is_better, better, worse)




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


# ----------------------------------------------------------------------------- the validation run


def _timing_summaries(timings: list[GenerationTiming]) -> dict[str, Any]:
    return {
        "ttft_ms": summarize(t.ttft_s * 1e3 for t in timings),
        "prefill_tokens_per_s": summarize(t.prefill_tokens_per_s for t in timings),
        "decode_tokens_per_s": summarize(t.decode_tokens_per_s for t in timings),
        "decode_step_ms": summarize(s * 1e3 for t in timings for s in t.decode_step_s),
        "total_ms": summarize(t.total_s * 1e3 for t in timings),
    }


def _validate_batch(backends: Mapping[str, Backend], baseline: str, prompts: torch.Tensor,
                    cfg: ValidateConfig) -> dict[str, Any]:
    names = [baseline, *(n for n in backends if n != baseline)]
    # Round-robin: baseline then each candidate, so every candidate run sits next to a baseline run.
    for _ in range(cfg.warmup):
        for name in names:
            time_generation(backends[name], prompts, cfg.new_tokens)
    timings: dict[str, list[GenerationTiming]] = {name: [] for name in names}
    for _ in range(cfg.repeats):
        for name in names:
            timings[name].append(time_generation(backends[name], prompts, cfg.new_tokens))

    # Memory in its own untimed run per backend, so the sampling thread never competes with a timed run.
    memory = {}
    for name in names:
        with PeakRssSampler() as rss:
            backends[name].generate(prompts, cfg.new_tokens, temperature=0.0, eos_token_id=None)
        memory[name] = {"rss_at_start_mib": rss.baseline_mb, "peak_rss_mib": rss.peak_mb,
                        "rss_growth_mib": rss.growth_mb, "samples": rss.samples}

    reference = timings[baseline][0].output_ids
    results = {}
    for name in names:
        # The baseline is compared with its own last run: a check that greedy decoding is deterministic.
        compared = timings[name][-1 if name == baseline else 0].output_ids
        results[name] = {**_timing_summaries(timings[name]), "memory": memory[name],
                         "greedy_agreement": agreement(reference, compared, prompts.shape[1])}

    base = timings[baseline]
    comparisons = {
        name: {
            "decode_tokens_per_s": compare_pairs([t.decode_tokens_per_s for t in base],
                                                 [t.decode_tokens_per_s for t in timings[name]],
                                                 higher_is_better=True).to_dict(),
            "time_to_first_token": compare_pairs([t.ttft_s for t in base], [t.ttft_s for t in timings[name]],
                                                 higher_is_better=False).to_dict(),
        }
        for name in names[1:]
    }
    return {"batch_size": int(prompts.shape[0]), "backends": results, "comparisons": comparisons}


def validate(backends: Mapping[str, Backend], baseline: str, prompts_source: torch.Tensor, cfg: ValidateConfig,
             perplexity_split: torch.Tensor, perplexity_batch_size: int = 8) -> dict[str, Any]:
    """Measure every backend and compare each with `baseline`; returns the JSON-serializable report.

    Prompts for batch size b are the first b rows' first `cfg.prompt_len` tokens of
    `prompts_source` (a packed split), so every backend and every run sees the same input.
    Perplexity uses the first `cfg.perplexity_batches` batches of `perplexity_batch_size` rows.
    """
    if baseline not in backends:
        raise ValueError(f"baseline {baseline!r} is not among the backends {sorted(backends)}")
    rows_needed, columns = max(cfg.batch_sizes), prompts_source.shape[1]
    if len(prompts_source) < rows_needed or columns < cfg.prompt_len:
        raise ValueError(f"prompts need {rows_needed} rows of {cfg.prompt_len} tokens; the prompt source has "
                         f"{len(prompts_source)} rows of {columns}")
    names = [baseline, *(n for n in backends if n != baseline)]
    batches = [_validate_batch(backends, baseline, prompts_source[:b, :cfg.prompt_len].contiguous(), cfg)
               for b in cfg.batch_sizes]
    return {
        "baseline": baseline,
        "backends": names,
        "method": {
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "order": "interleaved round-robin after the warm-up rounds: baseline, then each candidate, repeated "
                     "`repeats` times (A B A B ... with one candidate)",
            "ratio": "per round, candidate vs baseline, > 1 means the candidate is better: candidate/baseline for "
                     "decode tokens/s, baseline/candidate for time to first token",
            "summary": "median of the per-round ratios",
            "spread": SPREAD_DEFINITION,
            "verdict": VERDICT_RULE,
            "timing": "time.perf_counter; greedy, eos disabled, exactly new_tokens per run; GC paused in timed runs; "
                      "TTFT = call to first token; decode tokens/s = batch * (new_tokens - 1) / time from first to "
                      "last token",
            "memory": f"process RSS polled every {RSS_POLL_S * 1e3:g} ms by a thread during one extra untimed generation per backend; "
                      "RSS is process-wide, so growth is the backend's working memory on top of what is loaded",
            "perplexity": "exp of mean next-token cross entropy from backend.logits (no cache)",
            "greedy_agreement": "generated tokens equal position-wise to the baseline's first timed run (the "
                                "baseline is checked against its own last run)",
            "torch_threads": torch.get_num_threads(),
        },
        "config": {"prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "batch_sizes": list(cfg.batch_sizes),
                   "perplexity_batches": cfg.perplexity_batches, "perplexity_batch_size": perplexity_batch_size},
        "units": {"ttft_ms": "milliseconds", "decode_step_ms": "milliseconds per token step (all rows)",
                  "total_ms": "milliseconds per generate call", "prefill_tokens_per_s": "prompt tokens/s, whole batch",
                  "decode_tokens_per_s": "generated tokens/s after the first, whole batch", "memory": "MiB"},
        "perplexity": {name: perplexity(backends[name], perplexity_split, perplexity_batch_size,
                                        cfg.perplexity_batches) for name in names},
        "batches": batches,
    }


# ----------------------------------------------------------------------------- rendering


METRIC_LABELS = {"decode_tokens_per_s": "decode tok/s", "time_to_first_token": "time to first token"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def validation_markdown(report: Mapping[str, Any]) -> str:
    """Compact tables: one per batch size for the backends, one for the paired comparisons."""
    from .report import markdown_table

    m, c = report["method"], report["config"]
    lines = [
        "## Inference validation",
        "",
        f"Baseline **{report['baseline']}**. Prompt {c['prompt_len']} tokens, {c['new_tokens']} new tokens, greedy. "
        f"{m['repeats']} timed runs per backend after {m['warmup']} warm-up runs, interleaved with the baseline. "
        f"Ratio > 1 means the candidate is better; spread = IQR of the per-run ratios; a difference within the "
        f"spread is \"no measurable difference\".",
        "",
    ]
    for batch in report["batches"]:
        rows = []
        for name, r in batch["backends"].items():
            ga = r["greedy_agreement"]
            rows.append([name, f"{r['ttft_ms']['p50']:.2f}", f"{r['decode_tokens_per_s']['p50']:.1f}",
                         f"{r['memory']['peak_rss_mib']:.0f}", f"{report['perplexity'][name]:.3f}",
                         f"{_pct(ga['token_agreement'])} / {_pct(ga['sequence_agreement'])}"])
        lines += [f"### Batch size {batch['batch_size']}", "",
                  markdown_table(["backend", "TTFT p50 ms", "decode tok/s p50", "peak RSS MiB", "perplexity",
                                  "greedy agreement (tokens / sequences)"], rows), ""]
        comparisons = [[f"{name} vs {report['baseline']}", METRIC_LABELS[metric], f"{cmp['median_ratio']:.3f}",
                        f"[{cmp['p25']:.3f}, {cmp['p75']:.3f}]", cmp["verdict"]]
                       for name, by_metric in batch["comparisons"].items() for metric, cmp in by_metric.items()]
        if comparisons:
            lines += [markdown_table(["comparison", "metric", "median ratio", "[p25, p75]", "verdict"],
                                     comparisons), ""]
    return "\n".join(lines)


def plot_validation(report: Mapping[str, Any], path: str | Path) -> None:
    """PNG: decode tokens/s and time to first token (p50 bars, min-max whiskers) per backend per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, batches = report["backends"], report["batches"]
    x = np.arange(len(batches))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s (higher is better)"),
                           (axes[1], "ttft_ms", "time to first token, ms (lower is better)")):
        for i, name in enumerate(names):
            stats = [b["backends"][name][key] for b in batches]
            p50 = np.array([s["p50"] for s in stats])
            whiskers = np.array([[s["p50"] - s["min"] for s in stats], [s["max"] - s["p50"] for s in stats]])
            ax.bar(x + (i - (len(names) - 1) / 2) * width, p50, width, yerr=whiskers, capsize=3, label=name,
                   color=f"C{i}")
        ax.set_xticks(x, [f"batch {b['batch_size']}" for b in batches])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Inference, p50 of {report['method']['repeats']} runs (whiskers: min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
