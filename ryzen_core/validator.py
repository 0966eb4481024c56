"""Inference validation: speed, memory and quality of inference backends, measured in one run.

Comparisons follow the one method in `ryzen_core.measure`: baseline and candidates are timed
in the same process, interleaved round after round (baseline, then each candidate) after
`warmup` untimed rounds; each round gives a ratio (> 1: the candidate is better); the headline
is the median ratio with a 95% bootstrap interval, rounds are added (up to `max_repeats`) until
the interval is narrow, and a verdict is given only when the interval excludes 1.

How one backend is timed (generation, memory, perplexity) is `generation_timing`; where it
runs while measured is `workers`.
"""
from __future__ import annotations

import gc
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .backends import Backend
from .config import ValidateConfig
from .measure import (INTERVAL_DEFINITION, VERDICT_RULE, PairedComparison, busy_warning, compare_pairs,  # noqa: F401
                      conditions, format_ratio, load_snapshot, measure_until_narrow, paired_ratios, summarize)
from .generation_timing import (RSS_POLL_S, GenerationTiming, PeakRssSampler, agreement,  # noqa: F401
                                current_rss_mib, greedy_agreement, perplexity, process_peak_rss_mib,
                                reset_process_peak_rss, time_generation)
from .progress import Progress, progress
from .workers import WorkerFailed, peak_rss_method, pinned_threads, start_worker

# ----------------------------------------------------------------------------- the validation run


def _timing_summaries(timings: list[GenerationTiming]) -> dict[str, Any]:
    return {
        "ttft_ms": summarize(t.ttft_s * 1e3 for t in timings),
        "prefill_tokens_per_s": summarize(t.prefill_tokens_per_s for t in timings),
        "decode_tokens_per_s": summarize(t.decode_tokens_per_s for t in timings),
        "decode_step_ms": summarize(s * 1e3 for t in timings for s in t.decode_step_s),
        "total_ms": summarize(t.total_s * 1e3 for t in timings),
    }


def _validate_batch(workers: Mapping[str, Any], baseline: str, prompts: torch.Tensor, cfg: ValidateConfig,
                    fidelity_reference: Mapping[str, str], reference_workers: Mapping[str, Any],
                    failures: dict[str, dict[str, str]]) -> dict[str, Any]:
    stage = f"batch size {prompts.shape[0]}"
    names = [name for name in workers if name not in failures]  # the baseline first
    timings: dict[str, list[GenerationTiming]] = {name: [] for name in names}

    def drop(name: str, exc: WorkerFailed) -> None:
        _record_failure(failures, name, stage, exc, baseline)
        names.remove(name)
        timings.pop(name)

    def run(name: str, keep: bool) -> None:
        time.sleep(cfg.settle_ms / 1e3)  # the previous backend's spinning threads park first
        try:
            timing = workers[name].time_generation(prompts, cfg.new_tokens)
        except WorkerFailed as exc:
            drop(name, exc)
            return
        if keep:
            timings[name].append(timing)

    # Round-robin: baseline then each candidate, so every candidate run sits next to a baseline run.
    for _ in range(cfg.warmup):
        for name in list(names):
            run(name, keep=False)

    bar = Progress(f"validation, batch size {len(prompts)}", max(cfg.repeats, cfg.max_repeats), unit="round")

    def one_round() -> None:
        for name in list(names):
            run(name, keep=True)
        bar.update()

    loads = [load_snapshot()]
    with bar:  # rounds stop early once every interval is narrow enough
        rounds = measure_until_narrow(one_round, lambda: [c for by_metric in _compare(timings, names).values()
                                                          for c in by_metric.values()],
                                      cfg.repeats, cfg.max_repeats, cfg.target_half_width)
    loads.append(load_snapshot())

    memory = {}
    for name in list(names):
        try:
            memory[name] = workers[name].memory(prompts, cfg.new_tokens)
        except WorkerFailed as exc:
            drop(name, exc)

    outputs = _reference_outputs(timings, fidelity_reference, reference_workers, prompts, cfg.new_tokens)
    results = {}
    for name in names:
        reference = fidelity_reference.get(name, baseline)
        results[name] = {**_timing_summaries(timings[name]), "memory": memory[name],
                         "export_fidelity": {"reference": reference,
                                             **_agreement_with(reference, name, timings, outputs, prompts)},
                         "agreement_with_baseline": {"reference": baseline,
                                                     **_agreement_with(baseline, name, timings, outputs, prompts)}}

    comparisons = {name: {metric: c.to_dict() for metric, c in by_metric.items()}
                   for name, by_metric in _compare(timings, names).items()}
    measured = [c for by_metric in comparisons.values() for c in by_metric.values()]
    return {"batch_size": int(prompts.shape[0]), "backends": results, "comparisons": comparisons,
            "rounds": rounds, "conditions": conditions(loads, measured)}


def _record_failure(failures: dict[str, dict[str, str]], name: str, stage: str, exc: Exception, baseline: str) -> None:
    if name == baseline:
        from .errors import RyzenError

        raise RyzenError(f"inference validation: the baseline {exc}; nothing can be compared without it") from None
    failures[name] = {"stage": stage, "reason": str(exc)}


def _reference_outputs(timings: Mapping[str, list[GenerationTiming]], fidelity_reference: Mapping[str, str],
                       reference_workers: Mapping[str, Any], prompts: torch.Tensor,
                       new_tokens: int) -> dict[str, torch.Tensor | str]:
    """Greedy output of every timed backend (its first timed run) and of each untimed fidelity reference."""
    outputs: dict[str, torch.Tensor | str] = {name: runs[0].output_ids for name, runs in timings.items()}
    for reference in {fidelity_reference[n] for n in timings if n in fidelity_reference} - set(outputs):
        try:
            outputs[reference] = reference_workers[reference].generate(prompts, new_tokens)
        except (KeyError, WorkerFailed) as exc:
            outputs[reference] = f"reference {reference!r} unavailable: {exc}"
    return outputs


def _agreement_with(reference: str, name: str, timings: Mapping[str, list[GenerationTiming]],
                    outputs: Mapping[str, torch.Tensor | str], prompts: torch.Tensor) -> dict[str, Any]:
    """Greedy agreement of `name`'s first timed run with `reference`'s; a backend that is its own
    reference is compared with its own last run, which checks that its greedy decoding is deterministic."""
    if reference == name:
        return agreement(timings[name][0].output_ids, timings[name][-1].output_ids, prompts.shape[1])
    expected = outputs.get(reference, f"reference {reference!r} failed")
    if isinstance(expected, str):
        return {"unavailable": expected}
    return agreement(expected, timings[name][0].output_ids, prompts.shape[1])


def _compare(timings: Mapping[str, list[GenerationTiming]], names: list[str]) -> dict[str, dict[str, PairedComparison]]:
    """Each candidate (names[1:]) against the baseline (names[0]), per metric, round by round."""
    base = timings[names[0]]
    return {name: {"decode_tokens_per_s": compare_pairs([t.decode_tokens_per_s for t in base],
                                                        [t.decode_tokens_per_s for t in timings[name]], True),
                   "time_to_first_token": compare_pairs([t.ttft_s for t in base], [t.ttft_s for t in timings[name]],
                                                        False)}
            for name in names[1:]}


def _start(entries: Mapping[str, Any], cfg: ValidateConfig, threads: int) -> dict[str, Any]:
    return {name: start_worker(entry, cfg.isolation, threads, cfg.worker_timeout_s) for name, entry in entries.items()}


def _perplexities(workers: Mapping[str, Any], baseline: str, split: torch.Tensor, batch_size: int, batches: int,
                  failures: dict[str, dict[str, str]]) -> dict[str, float]:
    """Perplexity of every backend that started; it runs before the timed rounds and warms each backend up."""
    result = {}
    for name, worker in progress(workers.items(), "validation perplexity", len(workers), unit="backend"):
        if worker.failure is not None:
            _record_failure(failures, name, "start", WorkerFailed(f"backend {name!r}: {worker.failure}"), baseline)
            continue
        try:
            result[name] = worker.perplexity(split, batch_size, batches)
        except WorkerFailed as exc:
            _record_failure(failures, name, "perplexity", exc, baseline)
    return result


def validate(backends: Mapping[str, Any], baseline: str, prompts_source: torch.Tensor, cfg: ValidateConfig,
             perplexity_split: torch.Tensor, perplexity_batch_size: int = 8,
             fidelity_reference: Mapping[str, str] | None = None,
             reference_backends: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Measure every backend and compare each with `baseline`; returns the JSON-serializable report.

    A backend is a live `Backend` (run in this process), a recipe (`ryzen_core.workers`; built and
    run in its own worker process, or here when `cfg.isolation` is 'inline') or a started worker.
    A backend that fails to start, raises, crashes or hangs is listed under "failures" with the
    reason, and the others are measured without it.

    Prompts for batch size b are the first b rows' first `cfg.prompt_len` tokens of
    `prompts_source` (a packed split), so every backend and every run sees the same input.
    Perplexity uses the first `cfg.perplexity_batches` batches of `perplexity_batch_size` rows.

    Export fidelity compares each backend's greedy output with the variant's own torch fp32
    model, named by `fidelity_reference` (default: the baseline) and found among the backends
    or in `reference_backends` (generated once per batch size, untimed); agreement with the
    baseline is reported beside it.
    """
    if baseline not in backends:
        raise ValueError(f"baseline {baseline!r} is not among the backends {sorted(backends)}")
    rows_needed, columns = max(cfg.batch_sizes), prompts_source.shape[1]
    if len(prompts_source) < rows_needed or columns < cfg.prompt_len:
        raise ValueError(f"prompts need {rows_needed} rows of {cfg.prompt_len} tokens; the prompt source has "
                         f"{len(prompts_source)} rows of {columns}")
    fidelity_reference = dict(fidelity_reference or {})
    threads = pinned_threads(cfg)
    failures: dict[str, dict[str, str]] = {}
    workers = _start({name: backends[name] for name in [baseline, *(n for n in backends if n != baseline)]},
                     cfg, threads)
    references = _start({n: e for n, e in (reference_backends or {}).items() if n not in backends}, cfg, threads)
    try:
        perplexities = _perplexities(workers, baseline, perplexity_split, perplexity_batch_size,
                                     cfg.perplexity_batches, failures)
        batches = [_validate_batch(workers, baseline, prompts_source[:b, :cfg.prompt_len].contiguous(), cfg,
                                   fidelity_reference, {**workers, **references}, failures)
                   for b in cfg.batch_sizes]
    finally:
        for worker in [*workers.values(), *references.values()]:
            worker.close()
    return {
        "baseline": baseline,
        "backends": [name for name in workers if name not in failures],
        "failures": failures,
        "workers": _described(workers),
        "reference_workers": _described(references),
        "method": _method(cfg, threads, {w.isolation for w in workers.values()}),
        "config": {"prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "batch_sizes": list(cfg.batch_sizes),
                   "perplexity_batches": cfg.perplexity_batches, "perplexity_batch_size": perplexity_batch_size,
                   "isolation": cfg.isolation, "threads": threads},
        "units": {"ttft_ms": "milliseconds", "decode_step_ms": "milliseconds per token step (all rows)",
                  "total_ms": "milliseconds per generate call", "prefill_tokens_per_s": "prompt tokens/s, whole batch",
                  "decode_tokens_per_s": "generated tokens/s after the first, whole batch", "memory": "MiB"},
        "perplexity": perplexities,
        "batches": batches,
    }


def _described(workers: Mapping[str, Any]) -> dict[str, Any]:
    """Each worker as it ran: isolation, facts, and what its plugins recorded and disabled while it was built."""
    return {name: {**w.describe(), "plugin_events": w.ready.get("events", []),
                   "plugin_disabled": w.ready.get("disabled", {})} for name, w in workers.items()}


INLINE_MEMORY_METHOD = (f"inline backends: this process's RSS polled every {RSS_POLL_S * 1e3:g} ms by a thread during "
                        "one extra untimed generation per backend; RSS is process-wide, so it counts every model "
                        "this process holds, and rss_growth_mib is the backend's working memory on top")


def _method(cfg: ValidateConfig, threads: int, isolations: set[str]) -> dict[str, Any]:
    memory = [peak_rss_method()] if "process" in isolations else []
    memory += [INLINE_MEMORY_METHOD] if "inline" in isolations else []
    return {
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "max_repeats": cfg.max_repeats,
        "order": "interleaved round-robin after the warm-up rounds: baseline, then each candidate, round after "
                 "round (A B A B ... with one candidate)",
        "ratio": "per round, candidate vs baseline, > 1 means the candidate is better: candidate/baseline for "
                 "decode tokens/s, baseline/candidate for time to first token",
        "summary": "median of the per-round ratios",
        "interval": INTERVAL_DEFINITION,
        "rounds": f"at least `repeats`, more (up to {cfg.max_repeats}) until every interval's half-width is at "
                  f"most {cfg.target_half_width:.0%} of its median",
        "verdict": VERDICT_RULE,
        "isolation": "process: each backend is built and run in its own worker process (startup and model load "
                     "untimed), only one runs at a time, and the parent waits idle on a pipe; inline: in this "
                     "process. Each backend's isolation is listed under workers",
        "timing": "time.perf_counter inside the process that runs the backend, around the generation itself; "
                  "greedy, eos disabled, exactly new_tokens per run; GC paused in timed runs; TTFT = call to first "
                  "token; decode tokens/s = batch * (new_tokens - 1) / time from first to last token",
        "memory": "; ".join(memory),
        "perplexity": "exp of mean next-token cross entropy from backend.logits (no cache), computed before the "
                      "timed rounds",
        "export_fidelity": "generated tokens equal position-wise to those of the variant's own torch fp32 model "
                           "(the reference named in each entry); a backend that is its own reference is checked "
                           "against its own last run (greedy determinism)",
        "agreement_with_baseline": "generated tokens equal position-wise to the baseline's first timed run; for a "
                                   "variant whose weights differ from the baseline's, this measures the training "
                                   "change, not the export",
        "threads": threads,
    }


# ----------------------------------------------------------------------------- rendering


METRIC_LABELS = {"decode_tokens_per_s": "decode tok/s", "time_to_first_token": "time to first token"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


ISOLATION_NOTES = {
    "process": "Each backend ran alone in its own worker process (startup and model load untimed), so peak RSS is "
               "that process's own, model load included.",
    "inline": "Every backend ran in this one process, so peak RSS counts everything the process held.",
}


def _isolation_note(report: Mapping[str, Any]) -> str:
    inline = sorted(n for n, w in report.get("workers", {}).items() if w["isolation"] == "inline")
    if not inline:
        return ISOLATION_NOTES["process"]
    if len(inline) == len(report["workers"]):
        return ISOLATION_NOTES["inline"]
    return f"{ISOLATION_NOTES['process']} Except {', '.join(inline)}, run in this process (see workers in the JSON)."


def _agreement_cell(figure: Mapping[str, Any], show_reference: bool = False) -> str:
    if "unavailable" in figure:
        return "n/a"
    against = f" vs {figure['reference']}" if show_reference else ""
    return f"{_pct(figure['token_agreement'])} / {_pct(figure['sequence_agreement'])}{against}"


def validation_markdown(report: Mapping[str, Any]) -> str:
    """Compact tables: one per batch size for the backends, one for the paired comparisons."""
    from .report import markdown_table

    m, c = report["method"], report["config"]
    lines = [
        "## Inference validation",
        "",
        f"Baseline **{report['baseline']}**. Prompt {c['prompt_len']} tokens, {c['new_tokens']} new tokens, greedy. "
        f"{m['repeats']} to {m.get('max_repeats', m['repeats'])} timed runs per backend after {m['warmup']} warm-up "
        f"runs, interleaved with the baseline. Ratio > 1 means the candidate is better; `1.38x [1.31, 1.44]` is the "
        f"median per-run ratio and its 95% bootstrap interval; \"faster\" or \"slower\" only when the interval "
        f"excludes 1, else \"no measurable difference\".",
        "",
        _isolation_note(report) + " Export fidelity: greedy tokens equal to the variant's own "
        "torch fp32 model's (named after the figure); agreement with baseline: equal to the baseline's, which for a "
        "variant trained differently measures the training change, not the export.",
        "",
    ]
    for name, failure in report.get("failures", {}).items():
        lines += [f"- **{name} failed** ({failure['stage']}): {failure['reason']}"]
    lines += [""] if report.get("failures") else []
    for batch in report["batches"]:
        rows = []
        for name, r in batch["backends"].items():
            rows.append([name, f"{r['ttft_ms']['p50']:.2f}", f"{r['decode_tokens_per_s']['p50']:.1f}",
                         f"{r['memory']['peak_rss_mib']:.0f}", f"{report['perplexity'][name]:.3f}",
                         _agreement_cell(r["export_fidelity"], True), _agreement_cell(r["agreement_with_baseline"])])
        lines += [f"### Batch size {batch['batch_size']}", ""]
        warning = busy_warning(batch.get("conditions"))
        lines += [warning, ""] if warning else []
        lines += [markdown_table(["backend", "TTFT p50 ms", "decode tok/s p50", "peak RSS MiB", "perplexity",
                                  "export fidelity (tokens / sequences)", "agreement with baseline"], rows), ""]
        comparisons = [[f"{name} vs {report['baseline']}", METRIC_LABELS[metric], format_ratio(cmp), cmp["n"],
                        cmp["verdict"]]
                       for name, by_metric in batch["comparisons"].items() for metric, cmp in by_metric.items()]
        if comparisons:
            lines += [markdown_table(["comparison", "metric", "ratio [95% interval]", "runs", "verdict"],
                                     comparisons), ""]
    return "\n".join(lines)


def plot_validation(report: Mapping[str, Any], path: str | Path) -> None:
    """PNG: each candidate's ratio to the baseline (median, 95% interval bars) per batch size, for decode
    tokens/s and time to first token; 1 is the baseline, above it the candidate is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    candidates, batches = report["backends"][1:], report["batches"]
    x = np.arange(len(batches))
    width = 0.8 / max(len(candidates), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, METRIC_LABELS):
        for i, name in enumerate(candidates):
            cmps = [b["comparisons"][name][metric] for b in batches]
            median = np.array([c["median_ratio"] for c in cmps])
            bars = np.array([median - [c["ci_low"] for c in cmps], [c["ci_high"] for c in cmps] - median])
            ax.errorbar(x + (i - (len(candidates) - 1) / 2) * width, median, yerr=bars, fmt="os^vDP"[i % 6],
                        capsize=4, color=f"C{i + 1}", label=name)
        ax.axhline(1.0, color="k", lw=1, ls="--", label=f"{report['baseline']} (baseline)")
        ax.set_yscale("log")  # ratios: 2x and 0.5x sit equally far from 1
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(x, [f"batch {b['batch_size']}" for b in batches])
        ax.set_title(f"{METRIC_LABELS[metric]}: ratio to {report['baseline']} (> 1 is better)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Inference: median per-run ratio, bars = 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
