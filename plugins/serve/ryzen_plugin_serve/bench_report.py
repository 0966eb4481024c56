"""What `ryzen bench serve` writes: the report as JSON, a Markdown table, and a PNG of latency against
throughput (one line per server, one point per load level)."""
from __future__ import annotations

from pathlib import Path

from ryzen_core import busy_warning, format_ratio, markdown_table, write_json

HEADERS = ["load", "server", "req/s", "gen tok/s", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms",
           "e2e p50/p95/p99 ms", "goodput req/s", "errors", "mean batch", "TTFT p95 / at lowest load"]


def _triple(latency: dict | None) -> str:
    return "-" if latency is None else "/".join(f"{latency[q]:.0f}" for q in ("p50", "p95", "p99"))


def _errors(errors: dict) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items())) or "0"


def table(report: dict) -> str:
    mode = report["settings"]["mode"]
    unit = "clients" if mode == "concurrency" else "req/s"
    lowest = report["levels"][0]["servers"] if report["levels"] else {}
    rows = []
    for entry in report["levels"]:
        for label, s in entry["servers"].items():
            first = (lowest.get(label) or {}).get("ttft_ms")
            scale = (f"{s['ttft_ms']['p95'] / first['p95']:.2f}x" if first and s["ttft_ms"] and first["p95"] > 0
                     else "-")
            rows.append([f"{entry['level']:g} {unit}", label, f"{s['requests_per_s']:.2f}", f"{s['tokens_per_s']:.0f}",
                         _triple(s["ttft_ms"]), _triple(s["itl_ms"]), _triple(s["e2e_ms"]),
                         f"{s['goodput_rps']:.2f}", _errors(s["errors"]),
                         "-" if s["mean_batch"] is None else f"{s['mean_batch']:.2f}", scale])
        if entry.get("ratio"):
            identity = entry["greedy_identity"]
            rows.append([f"{entry['level']:g} {unit}", "ratio", "", format_ratio(entry["ratio"]), "", "", "", "", "",
                         "", f"greedy identical {identity['identical']}/{identity['compared']}"])
    return markdown_table(HEADERS, rows)


def robustness_lines(report: dict) -> list[str]:
    lines = []
    for label, r in report["robustness"].items():
        answered = r["well_formed_answered"] == r["well_formed_sent"]
        lines.append(
            f"- {label}: {r['requests']} requests, {r['status_5xx']} answered 5xx; {r['well_formed_answered']}/"
            f"{r['well_formed_sent']} well-formed answered ({'all' if answered else 'NOT all'}); "
            f"{r['malformed_got_4xx']}/{r['malformed_sent']} malformed got 4xx; {r['disconnected']} clients "
            f"disconnected mid-stream, {r['cancelled_by_server']:.0f} sequences cancelled by the server; slots all "
            f"free after every load: {r['slots_freed_after_every_load']}; /health afterwards: {r['health_after']}")
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# ryzen bench serve: {report['model']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cores']} usable cores. "
             f"Command: `{report['command']}`", "",
             f"{s['mode']} levels {', '.join(f'{v:g}' for v in s['levels'])}; {s['requests_per_level_server_round']} "
             f"requests per level, server and round (at most {s['duration_s']:g} s), {s['rounds']} round(s); greedy, "
             f"max_tokens {s['max_tokens']}; goodput counts requests with TTFT <= {s['ttft_target_ms']:g} ms and "
             f"end-to-end <= {s['e2e_target_ms']:g} ms; {s['malformed_fraction']:.0%} malformed, "
             f"{s['disconnect_fraction']:.0%} disconnecting.", "", table(report), ""]
    warning = busy_warning(report["conditions"])
    if warning:
        lines += [warning, ""]
    lines += ["Robustness:", "", *robustness_lines(report), "", "![latency against throughput](bench_serve.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, label in zip(("tab:blue", "tab:orange", "tab:green"), report["servers"]):
        points = [(e["level"], e["servers"][label]) for e in report["levels"]]
        points = [(level, s) for level, s in points if s["e2e_ms"] and s["ttft_ms"]]
        x = [s["tokens_per_s"] for _, s in points]
        for axis, key, name in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "e2e_ms", "end-to-end")):
            for quantile, style in (("p50", "-o"), ("p95", "--^")):
                axis.plot(x, [s[key][quantile] for _, s in points], style, color=color, label=f"{label} {quantile}")
            for (level, s), xi in zip(points, x):
                axis.annotate(f"{level:g}", (xi, s[key]["p95"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
            axis.set_title(f"{name} against throughput")
            axis.set_xlabel("generated tokens/s")
            axis.set_ylabel("ms (log scale)")
            axis.set_yscale("log")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    unit = "clients" if report["settings"]["mode"] == "concurrency" else "req/s"
    figure.suptitle(f"ryzen bench serve {report['model']}: points labelled by load ({unit})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench_serve.json", "markdown": out_dir / "bench_serve.md",
             "png": out_dir / "bench_serve.png"}
    write_json(paths["json"], report)
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
