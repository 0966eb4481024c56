"""The kernel's section of report.md: the tuning table, the re-checks, and the utilization of the chosen path."""
from __future__ import annotations

from typing import Any

from ryzen_core import GEMM_SIZE, busy_warning, format_ratio, gemm_rates, markdown_table, peak_flops, utilization


def utilization_line(achieved: float, config, record) -> str:
    """The chosen path's FLOP/s against the matmul rates measured on this machine and the computed peaks."""
    peak, measured = peak_flops(), gemm_rates(config.data.cache_dir)
    figures = utilization(achieved, peak, measured)
    record("utilization", **figures, peak=peak, measured_gemm=measured)
    parts = [f"{figures[f'of_measured_{d}_gemm']:.1%} of the measured {d} matmul rate "
             f"({measured[d]['flops'] / 1e9:.0f} GFLOP/s, {GEMM_SIZE}x{GEMM_SIZE} on {measured['threads']} threads)"
             for d in ("fp32", "bf16") if measured.get(d)]
    parts += [f"{figures['of_computed_bf16_peak']:.1%} of the computed bf16 peak ({peak['bf16_flops'] / 1e9:.0f} "
              f"GFLOP/s, {peak['bf16_unit']})",
              f"{figures['of_computed_fp32_peak']:.1%} of the computed fp32 peak ({peak['fp32_flops'] / 1e9:.0f} GFLOP/s)"]
    return f"- model FLOPs utilization of the chosen path: {achieved / 1e9:.1f} GFLOP/s, " + ", ".join(parts)


def trial_rows(trials: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for t in trials:
        if t.get("error"):
            rows.append([f"{t['knob']}={t['value']}", "-", "-", "-", "-", f"failed: {t['error']}"])
            continue
        s = t["speedup"]
        rows.append([f"{t['knob']}={t['value']}", t["tokens_per_s_baseline"], t["tokens_per_s_candidate"],
                     format_ratio(s), f"{t['loss_relative_difference']:.2%}",
                     ("kept" if t["accepted"] else "not kept") + f" ({s['verdict']}{'' if t['sound'] else ', not sound'})"])
    return rows


def decision_markdown(decision: dict[str, Any], source: str, state=None) -> str:
    """The decision as report.md shows it; with the training state, its re-checks and any switch back."""
    origin = {"measured": "measured in this run",
              "cache": f"reused from the cache: the trials below were measured {decision.get('created')} "
                       "(`kernel.retune=true` measures again)",
              "settings": "taken from settings without measuring"}[source]
    lines = [f"Chosen training path: **{decision['chosen_description']}**, {origin}."]
    warning = busy_warning(decision.get("conditions"))
    lines += ["", warning] if warning else []
    rows = trial_rows(decision.get("trials") or [])
    if rows:
        lines += ["", markdown_table(["candidate", "tokens/s before", "tokens/s with", "speedup [95% interval]",
                                      "loss vs fp32", "decision"], rows)]
    c = decision.get("confirmation")
    if c and not c.get("error"):
        s = c["speedup"]
        when = "this run" if source == "measured" or c.get("measured") else decision.get("created")
        lines += ["", f"Chosen vs fp32 eager reference, paired, measured {when}: **{format_ratio(s)}** "
                      f"({s['verdict']}), {c['tokens_per_s_baseline']:.0f} -> "
                      f"{c['tokens_per_s_candidate']:.0f} tokens/s over {s['n']} rounds."
                      + (f" Fell back to the reference: {c['fell_back']}." if c.get("fell_back") else "")]
    for knob, why in (decision.get("not_tried") or {}).items():
        lines.append(f"- {knob} not tuned: {why}")
    if state is not None:
        if state.resumed_on:
            lines.append(f"- resumed from a checkpoint trained on {state.resumed_on}, which training went on with")
        for check in state.rechecks:
            lines.append(f"- re-check at evaluation {check['epoch']}: {format_ratio(check)} {check['verdict']}")
        if state.reverted:
            lines.append(f"- **switched back to the plain path**: {state.reverted}")
    return "\n".join(lines)
