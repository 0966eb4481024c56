"""Where the model should run: every backend of a validation side by side, grouped by quality class.

Built from a validation report (`validator.validate`) plus what each backend says of itself
(`precision`, `weight_bytes`; see docs/plugins.md). Nothing here is timed again: every figure
is one the validator measured, interleaved in the same rounds, so any two backends can be
paired round by round, not just each against the baseline.

- **Quality class** from the weights' precision: fp32-exact, 16-bit, 8-bit, 4-bit (or "other"
  when a backend does not say).
- **Per class**, the fastest backend at batch 1 and its ratio to the runner-up, with the 95%
  interval (`measure.compare_pairs` on their per-round decode rates); the recommendation names
  a winner only when that interval excludes 1.
- **The bound.** At batch 1 each decoded token reads every weight once plus the KV cache, so
  decode tokens/s x bytes per token cannot exceed the read bandwidth at that working-set
  size, measured on this machine (`hardware_limits.read_bandwidth_gbs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .measure import compare_pairs, format_ratio

QUALITY_CLASSES = ("fp32-exact", "16-bit", "8-bit", "4-bit", "ternary", "other")
_PRECISION_CLASS = {
    "fp32-exact": {"fp32", "float32", "f32", "float"},
    "16-bit": {"fp16", "f16", "float16", "bf16", "bfloat16", "int8_bfloat16"},
    "8-bit": {"int8", "q8_0", "int8_float32", "int8_float16", "int8-dynamic", "qint8"},
    "4-bit": {"int4", "q4_0", "q4_1", "q4_k", "q4_k_m", "nf4", "int4-weight"},
    "ternary": {"ternary", "tq2_0", "tq1_0", "i2_s"},  # BitNet b1.58 weights, 1.6-2 bits each
}
MIB = 1024 * 1024


def quality_class(precision: str | None) -> str:
    key = (precision or "").strip().lower()
    return next((cls for cls, names in _PRECISION_CLASS.items() if key in names), "other")


def _round_values(batch: Mapping[str, Any], baseline: str, name: str) -> list[float] | None:
    """One backend's decode tokens/s per timed round, in round order (from the paired comparisons)."""
    comparisons = batch.get("comparisons", {})
    if name == baseline:
        first = next(iter(comparisons.values()), None)
        return None if first is None else first["decode_tokens_per_s"]["values_a"]
    cmp = comparisons.get(name, {}).get("decode_tokens_per_s")
    return None if cmp is None else cmp["values_b"]


def _pair(batch: Mapping[str, Any], baseline: str, a: str, b: str) -> dict[str, Any] | None:
    """b against a, round by round (> 1: b decodes faster)."""
    values_a, values_b = _round_values(batch, baseline, a), _round_values(batch, baseline, b)
    if not values_a or not values_b or len(values_a) != len(values_b):
        return None
    return compare_pairs(values_a, values_b, higher_is_better=True).to_dict()


def _bound(info: Mapping[str, Any], decode_b1: float | None, mean_context: float,
           bandwidth: Callable[[int], float]) -> dict[str, Any] | None:
    weights = info.get("weight_bytes")
    if not weights or not decode_b1:
        return None
    per_token = int(weights) + int((info.get("kv_bytes_per_position") or 0) * mean_context)
    working_set = max(MIB, 1 << int(np.ceil(np.log2(per_token))))  # powers of two: few sizes, cached
    gb_per_s = bandwidth(working_set)
    return {"bytes_per_token": per_token, "working_set_bytes": working_set, "read_gb_per_s": gb_per_s,
            "bound_tokens_per_s": gb_per_s * 1e9 / per_token,
            "fraction_of_bound": decode_b1 * per_token / (gb_per_s * 1e9)}


def runtime_table(report: Mapping[str, Any], backend_info: Mapping[str, Mapping[str, Any]],
                  bandwidth: Callable[[int], float] | None = None) -> dict[str, Any]:
    """The table as JSON: a row per backend, then per quality class its ranking and recommendation.

    `backend_info[name]` holds what the backend said of itself (`ryzen_core.backends.FACTS`). A decode
    step at batch 1 reads the weights plus the KV cache at the mean context of the timed generations
    (prompt + half the new tokens).
    """
    if bandwidth is None:
        from .hardware_limits import read_bandwidth_gbs as bandwidth
    baseline = report["baseline"]
    batches = {b["batch_size"]: b for b in report["batches"]}
    mean_context = report["config"]["prompt_len"] + report["config"]["new_tokens"] / 2
    rows = []
    for name in report["backends"]:
        info = backend_info.get(name, {})
        per_batch = {size: b["backends"][name] for size, b in batches.items() if name in b["backends"]}
        decode = {size: r["decode_tokens_per_s"]["p50"] for size, r in per_batch.items()}
        row = {"backend": name, "precision": info.get("precision"), "class": quality_class(info.get("precision")),
               "weight_bytes": info.get("weight_bytes"), "decode_tokens_per_s": decode,
               "prefill_tokens_per_s": {s: r["prefill_tokens_per_s"]["p50"] for s, r in per_batch.items()},
               "ttft_ms": {s: r["ttft_ms"]["p50"] for s, r in per_batch.items()},
               "peak_rss_mib": max((r["memory"].get("peak_rss_mib", 0) for r in per_batch.values()), default=None),
               "perplexity": report.get("perplexity", {}).get(name),
               "export_fidelity": {s: r["export_fidelity"].get("token_agreement") for s, r in per_batch.items()}}
        row["bound"] = _bound(info, decode.get(1), mean_context, bandwidth)
        rows.append(row)
    classes = {}
    for cls in QUALITY_CLASSES:
        members = [r for r in rows if r["class"] == cls]
        if members:
            classes[cls] = _rank_class(members, batches, baseline)
    return {"rows": rows, "classes": classes, "mean_context": mean_context,
            "method": "figures from the inference validation above (same interleaved rounds); per class, backends "
                      "ranked by batch-1 decode tokens/s p50, the leader paired round by round with the runner-up "
                      "(95% bootstrap interval of the median ratio); bound = measured read bandwidth at the "
                      "working-set size (weights + KV cache, rounded up to a power of two) / bytes per token"}


def _rank_class(members: list[dict[str, Any]], batches: Mapping[int, Any], baseline: str) -> dict[str, Any]:
    ranked = sorted(members, key=lambda r: -(r["decode_tokens_per_s"].get(1) or 0))
    leader = ranked[0]["backend"]
    pairs = {}
    if len(ranked) > 1:
        runner_up = ranked[1]["backend"]
        pairs = {size: _pair(batch, baseline, runner_up, leader) for size, batch in batches.items()}
    return {"ranking": [r["backend"] for r in ranked], "leader_vs_runner_up": pairs,
            "recommendation": _recommend(ranked, pairs)}


def _recommend(ranked: list[dict[str, Any]], pairs: Mapping[int, Any]) -> str:
    leader = ranked[0]
    cls = leader["class"]
    if len(ranked) == 1:
        return f"only {leader['backend']} in the {cls} class on this machine"
    runner_up = ranked[1]["backend"]
    pair = pairs.get(1)
    if pair is None:
        return f"{leader['backend']} leads the {cls} class at batch 1 (no paired rounds with {runner_up})"
    if pair["verdict"] == "faster":
        return (f"fastest {cls} path on this machine at batch 1: {leader['backend']}, {format_ratio(pair)} "
                f"the decode rate of {runner_up}")
    return (f"{cls} at batch 1: {leader['backend']} and {runner_up} are not distinguishable "
            f"({format_ratio(pair)}, no measurable difference)")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def runtime_markdown(table: Mapping[str, Any]) -> str:
    from .report import markdown_table

    rows = table["rows"]
    sizes = sorted({s for r in rows for s in r["decode_tokens_per_s"]})
    lines = ["## Where the model should run", "",
             "Every backend of the validation above, grouped by the precision of its weights. Decode and prefill are "
             "tokens/s p50 for the whole batch; perplexity through each backend's own logits; fidelity = greedy "
             "tokens equal to the variant's torch fp32 model's at batch 1. " + table["method"] + ".", ""]
    for cls, summary in table["classes"].items():
        lines += [f"### {cls}", "", f"**{summary['recommendation']}**", ""]
        header = (["backend", "precision"] + [f"decode b{s}" for s in sizes] + [f"prefill b{s}" for s in sizes]
                  + [f"TTFT b{s} ms" for s in sizes] + ["peak RSS MiB", "weights MiB", "perplexity", "fidelity b1",
                                                         "% of bound b1"])
        body = []
        for name in summary["ranking"]:
            r = next(row for row in rows if row["backend"] == name)
            bound = r["bound"]
            body.append([name, r["precision"] or "-"]
                        + [_fmt(r["decode_tokens_per_s"].get(s), ",.0f") for s in sizes]
                        + [_fmt(r["prefill_tokens_per_s"].get(s), ",.0f") for s in sizes]
                        + [_fmt(r["ttft_ms"].get(s), ".2f") for s in sizes]
                        + [_fmt(r["peak_rss_mib"], ".0f"),
                           _fmt(r["weight_bytes"] / MIB if r["weight_bytes"] else None, ".2f"),
                           _fmt(r["perplexity"], ".3f"),
                           _fmt(100 * r["export_fidelity"][1] if r["export_fidelity"].get(1) is not None else None,
                                ".1f"),
                           _fmt(100 * bound["fraction_of_bound"] if bound else None, ".0f")])
        lines += [markdown_table(header, body), ""]
        pairs = [f"batch {s}: {format_ratio(p)} ({p['verdict']})" for s, p in summary["leader_vs_runner_up"].items()
                 if p]
        if pairs:
            lines += [f"{summary['ranking'][0]} vs {summary['ranking'][1]}, decode: " + "; ".join(pairs), ""]
    bounded = [r for r in rows if r["bound"]]
    if bounded:
        lines += ["Bound at batch 1: " + "; ".join(
            f"{r['backend']} reads {r['bound']['bytes_per_token'] / MIB:.2f} MiB/token, this machine reads "
            f"{r['bound']['read_gb_per_s']:.1f} GB/s from a {r['bound']['working_set_bytes'] // MIB} MiB working "
            f"set, so at most {r['bound']['bound_tokens_per_s']:,.0f} tok/s" for r in bounded) + ".", ""]
    return "\n".join(lines)


def plot_runtime(table: Mapping[str, Any], path: str | Path) -> None:
    """PNG: batch-1 decode tokens/s against perplexity, one marker per backend, colour by quality class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {cls: f"C{i}" for i, cls in enumerate(QUALITY_CLASSES)}
    for cls in QUALITY_CLASSES:
        points = [r for r in table["rows"] if r["class"] == cls and r["perplexity"] and r["decode_tokens_per_s"].get(1)]
        for i, r in enumerate(points):
            ax.scatter(r["perplexity"], r["decode_tokens_per_s"][1], color=colours[cls], marker="os^vDP*X"[i % 8],
                       s=60, label=f"{r['backend']} ({cls})")
    ax.set_xlabel("perplexity through the backend (lower is better)")
    ax.set_ylabel("decode tokens/s, batch 1 (higher is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Speed against quality per backend")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
