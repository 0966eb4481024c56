"""`ryzen bench train`: training throughput and model FLOPs utilization, measured as paired
rounds (baseline steps, then candidate steps, repeated) in one process and compared as
`ryzen_core.measure` does (median ratio, 95% interval, verdict only when it excludes 1).

Utilization is stated twice: against the matmul rate measured on this machine
(`hardware_limits.gemm_rates`) and against the peak computed from the CPU's features
(`hardware.peak_flops`: usable cores x clock x FLOPs per cycle of the widest vector unit, with
the number of FMA units per core assumed and said so in every report).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .config import RunConfig
from .hardware import cpu_features, peak_flops
from .hardware_limits import GEMM_SIZE, gemm_rates, utilization
from .measure import (PairedComparison, busy_warning, compare_pairs, conditions, format_ratio, load_snapshot,
                      measure_until_narrow, summarize)
from .plugins import PluginHost


def bench_train(config: RunConfig, host: PluginHost, plugins: Sequence[str], rounds: int, steps_per_round: int,
                warmup_rounds: int = 1, max_rounds: int | None = None) -> dict[str, Any]:
    """Baseline and candidate trainers on the same data, timed in alternating rounds of optimizer steps:
    at least `rounds`, more (up to `max_rounds`) while the speedup's interval is wide."""
    import tempfile

    from .run import load_data
    from .trainer import Trainer

    data = load_data(config)
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {"baseline": Trainer(config, host, [], scratch, data, label="baseline")}
        if plugins:
            trainers["candidate"] = Trainer(config, host, list(plugins), scratch, data, label="candidate")
        tokens = trainers["baseline"].tokens_per_step * steps_per_round
        rates: dict[str, list[float]] = {k: [] for k in trainers}

        def one_round(record: bool = True) -> None:
            for label, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    trainer.train_step()
                if record:
                    rates[label].append(tokens / (time.perf_counter() - start))

        def speedup() -> list[PairedComparison]:
            return [compare_pairs(rates["baseline"], rates["candidate"], higher_is_better=True)] if plugins else []

        for _ in range(warmup_rounds):
            one_round(record=False)
        loads = [load_snapshot()]
        measured_rounds = measure_until_narrow(one_round, speedup, rounds, max_rounds or rounds)
        loads.append(load_snapshot())
        val_loss = {label: t.evaluate() for label, t in trainers.items()}
    model = trainers["baseline"].model
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    peak = peak_flops()
    measured = gemm_rates(config.data.cache_dir) if flops_per_token else None
    result: dict[str, Any] = {"peak": peak, "measured_gemm": measured, "tokens_per_round": tokens,
                              "steps_per_round": steps_per_round, "rounds": measured_rounds["rounds"],
                              "adaptive_rounds": measured_rounds, "warmup_rounds": warmup_rounds,
                              "flops_per_token": flops_per_token, "torch_threads": torch.get_num_threads(), "runs": {}}
    for label, trainer in trainers.items():
        run = {"plugins": trainer.plugins, "disabled": dict(host.disabled), "tokens_per_s": summarize(rates[label]),
               "val_loss_after": val_loss[label], "autocast_bf16": trainer.autocast}
        if flops_per_token:
            run["utilization"] = utilization(flops_per_token * run["tokens_per_s"]["p50"], peak, measured)
            run["mfu_fp32_peak"] = run["utilization"]["of_computed_fp32_peak"]
            run["mfu_bf16_peak"] = run["utilization"]["of_computed_bf16_peak"]
        result["runs"][label] = run
    if plugins:
        result["speedup"] = speedup()[0].to_dict()
    result["conditions"] = conditions(loads, [result["speedup"]] if plugins else [])
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def train_bench_markdown(result: dict[str, Any], config: RunConfig) -> str:
    from .report import markdown_table

    peak, measured = result["peak"], result.get("measured_gemm") or {}
    rows = []
    for label, run in result["runs"].items():
        t, u = run["tokens_per_s"], run.get("utilization") or {}
        rows.append([label, ",".join(run["plugins"]) or "-", f"{t['p50']:.0f}", f"{t['min']:.0f}-{t['max']:.0f}",
                     _pct(u.get("of_measured_fp32_gemm")), _pct(u.get("of_measured_bf16_gemm")),
                     _pct(u.get("of_computed_fp32_peak")), _pct(u.get("of_computed_bf16_peak")),
                     f"{run['val_loss_after']:.4f}"])
    gemm = ", ".join(f"{dtype} {measured[dtype]['flops'] / 1e9:.0f}" for dtype in ("fp32", "bf16")
                     if measured.get(dtype)) or "not measured"
    lines = [
        f"Training throughput, preset {config.model.preset}, batch {config.train.batch_size} x "
        f"{config.data.seq_len} tokens, {result['rounds']} rounds of {result['steps_per_round']} steps per side "
        f"after {result['warmup_rounds']} warm-up round, interleaved.",
        f"Machine: {cpu_features().model}, {peak['cores']} cores at {peak['clock_hz'] / 1e9:.2f} GHz. "
        f"Computed peak fp32 {peak['fp32_flops'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16_flops'] / 1e9:.0f} GFLOP/s "
        f"({peak['bf16_unit']}; {peak['fma_units_assumed']} FMA units per core assumed). Measured "
        f"{GEMM_SIZE}x{GEMM_SIZE} matmul on {result['torch_threads']} threads: {gemm} GFLOP/s.",
        "",
        markdown_table(["run", "plugins", "tokens/s p50", "tokens/s range", "of measured fp32 GEMM",
                        "of measured bf16 GEMM", "of computed fp32 peak", "of computed bf16 peak", "val loss after"],
                       rows),
    ]
    if "speedup" in result:
        s = result["speedup"]
        lines += ["", f"Speedup (median of per-round ratios, 95% interval): {format_ratio(s, 3)}, "
                      f"{s['n']} rounds, verdict: {s['verdict']}."]
    warning = busy_warning(result.get("conditions"))
    return "\n".join(lines + (["", warning] if warning else []))
