"""What a run writes for machines (JSON, CSV) and for people (Markdown, PNG plots),
plus the environment fingerprint every report carries."""
from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from .checkpoint import atomic_write_text


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(host=None) -> dict[str, Any]:
    """What the figures in a report were measured on."""
    import torch

    from .hardware import cpu_description

    env = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {d: package_version(d) for d in ("ryzen-core", "torch", "transformers", "onnxruntime", "tokenizers")},
    }
    if host is not None:
        env["plugins"] = {name: {"distribution": r.distribution, "version": r.version, "status": r.status}
                          for name, r in host.records.items()}
    return env


def plot_loss_curves(runs: Mapping[str, Any], path: Path) -> None:
    """Left: training loss per step and validation loss per evaluation, a colour, marker and line style per run
    (identical runs stay visible), perplexity on the right axis. Right: each run's validation loss minus the
    first run's (the baseline) at the same evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    baseline = next(iter(runs.values()), None)
    base_evals = {e["step"]: e["val_loss"] for e in baseline.evals} if baseline is not None else {}
    for i, (label, metrics) in enumerate(runs.items()):
        colour, marker, style = f"C{i}", "os^vDP*X"[i % 8], ("-", "--", ":", "-.")[i % 4]
        steps = [s for s in metrics.steps if s["loss"] == s["loss"]]  # NaN != NaN drops skipped steps
        ax.plot([s["tokens"] for s in steps], [s["loss"] for s in steps], color=colour, alpha=0.3, lw=1, ls=style)
        ax.plot([e["tokens"] for e in metrics.evals], [e["val_loss"] for e in metrics.evals], marker=marker, ls=style,
                color=colour, markerfacecolor="none", label=f"{label} (validation)")
        paired = [(e["tokens"], e["val_loss"] - base_evals[e["step"]]) for e in metrics.evals if e["step"] in base_evals]
        if i and paired:
            diff.plot(*zip(*paired), marker=marker, ls=style, color=colour, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    perplexity = ax.secondary_yaxis("right", functions=(lambda loss: np.exp(np.clip(loss, None, 50.0)),
                                                        lambda ppl: np.log(np.clip(ppl, 1e-12, None))))
    perplexity.set_ylabel("perplexity")
    ax.set_title("Loss: faint = training steps, markers = validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    diff.axhline(0.0, color="C0", lw=1, ls="--", label=f"{next(iter(runs), 'baseline')}")
    diff.set_xlabel("training tokens")
    diff.set_ylabel("validation loss minus baseline's")
    diff.set_title("Difference from the baseline (< 0 is better)")
    diff.grid(alpha=0.3)
    diff.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report.md sections


def fixed(value: Any, decimals: int, signed: bool = False) -> str:
    """A number with a fixed number of decimals (thousands separated), '-' for a missing one."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:{'+' if signed else ''},.{decimals}f}"


def training_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per variant: budget, speed, losses (4 decimals), perplexities (2), memory."""
    rows = [[label, fixed(s["steps"], 0), fixed(s["tokens"], 0), fixed(s["median_tokens_per_s"], 0),
             fixed(s["final_val_loss"], 4), fixed(s["test_perplexity"], 2), fixed(s["unigram_perplexity"], 2),
             fixed(s["peak_rss_mb"], 0), f"same as {s['shared_with']}" if s.get("shared_with") else s["stopped_because"]]
            for label, s in summaries.items()]
    return markdown_table(["run", "steps", "tokens", "median tokens/s", "val loss", "test ppl", "unigram ppl",
                           "peak RSS MiB", "stopped because"], rows)


def quality_table(summaries: Mapping[str, Mapping[str, Any]], baseline: str = "baseline") -> str | None:
    """Each variant's validation loss and test perplexity against the baseline's, with the differences and,
    for test perplexity, a 95% bootstrap interval over the test batches both models saw; None when there is
    nothing to compare."""
    base = summaries.get(baseline)
    others = {label: s for label, s in summaries.items() if label != baseline}
    if base is None or not others:
        return None

    def delta(value, reference, decimals):
        if value is None or reference is None:
            return "-"
        relative = f" ({(value - reference) / reference:+.2%})" if reference else ""
        return fixed(value - reference, decimals, signed=True) + relative

    rows = [[label, fixed(s["final_val_loss"], 4), delta(s["final_val_loss"], base["final_val_loss"], 4),
             fixed(s["test_perplexity"], 2), delta(s["test_perplexity"], base["test_perplexity"], 2),
             perplexity_interval(base.get("test_batch_losses"), s.get("test_batch_losses"))]
            for label, s in others.items()]
    rows.insert(0, [baseline, fixed(base["final_val_loss"], 4), "-", fixed(base["test_perplexity"], 2), "-", "-"])
    return markdown_table(["run", "val loss", f"vs {baseline}", "test ppl", f"vs {baseline}",
                           "test ppl change [95% interval]"], rows)


def perplexity_interval(base_losses: Sequence[float] | None, losses: Sequence[float] | None) -> str:
    """Relative test perplexity change with its interval: the mean per-batch loss difference (same batches)
    bootstrapped over batches, exponentiated; '-' when the batches do not pair."""
    from .measure import mean_interval

    if not base_losses or not losses or len(base_losses) != len(losses) or len(losses) < 2:
        return "-"
    differences = [b - a for a, b in zip(base_losses, losses)]
    low, high = mean_interval(differences)
    mean = sum(differences) / len(differences)
    return f"{math.expm1(mean):+.2%} [{math.expm1(low):+.2%}, {math.expm1(high):+.2%}]"


MAX_FIELDS_PER_EVENT = 6
MAX_EVENTS_PER_KIND = 5


def _brief(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return "{" + ", ".join(list(map(str, value))[:4]) + (", ..." if len(value) > 4 else "") + "}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def events_markdown(events: list[Mapping[str, Any]]) -> str | None:
    """What each plugin recorded, grouped by plugin: each event with its first fields, at most
    MAX_EVENTS_PER_KIND of a kind (all are in optimization_analysis.json). None when nothing was recorded."""
    by_plugin: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        by_plugin.setdefault(event["plugin"], []).append(event)
    if not by_plugin:
        return None
    lines = []
    for plugin, recorded in by_plugin.items():
        lines += [f"**{plugin}** ({len(recorded)} events)", ""]
        seen: dict[str, int] = {}
        for event in recorded:
            seen[event["event"]] = seen.get(event["event"], 0) + 1
            if seen[event["event"]] > MAX_EVENTS_PER_KIND:
                continue
            data = event.get("data") or {}
            fields = ", ".join(f"{k}={_brief(v)}" for k, v in list(data.items())[:MAX_FIELDS_PER_EVENT])
            more = f", +{len(data) - MAX_FIELDS_PER_EVENT} fields" if len(data) > MAX_FIELDS_PER_EVENT else ""
            lines.append(f"- `{event['event']}` in {event['hook']}" + (f": {fields}{more}" if fields else ""))
        lines += [f"- `{kind}`: {count - MAX_EVENTS_PER_KIND} more" for kind, count in seen.items()
                  if count > MAX_EVENTS_PER_KIND]
        lines.append("")
    return "\n".join(lines).rstrip()
