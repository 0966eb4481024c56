"""What this machine actually does: its matrix-multiply rate per dtype and its memory read bandwidth,
measured on the live machine and cached, so utilization figures have a measured denominator.

A computed peak (`hardware.peak_flops`) assumes a clock and a number of FMA units; the real machine
may turbo above that clock or fail to reach it, and bf16 may or may not run on a matrix unit.
Reports state both: utilization against the computed peak and against the measured rate.

- GEMM: `torch.matmul` of two n x n matrices (n = 2048) on the configured torch threads, best
  of a few repeats after one warm-up, 2 n^3 FLOPs each. bf16 is measured only on CPUs with
  native bf16 (AVX-512 BF16 or AMX); elsewhere it is emulated and the fp32 rate is the better bound.
- Read bandwidth: `torch.sum` over a float32 buffer of the working-set size on 1 thread and on
  the configured threads, the best of at least 5 repeats of each (more for small sets, for 0.3 s) after one warm-up; bytes read per second. A
  working set that fits in the last-level cache measures the cache, one far larger (1 GiB)
  measures DRAM; pass the bytes a decode step actually reads. The load average at the time
  is stored with each figure: a busy machine measures low.

Results are cached as JSON under `$RYZEN_CACHE_DIR/hardware/`, one file per CPU signature (model,
flags, usable cores), torch version and thread count; delete it to measure again.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import atomic_write_text
from .hardware import cpu_features, native_bf16

GEMM_SIZE = 2048
GEMM_REPEATS = 3
BANDWIDTH_REPEATS = 5
BANDWIDTH_MIN_SECONDS = 0.3
"""Small working sets are read again until this much time has passed: on a shared machine a short
run is often descheduled, and the best of many is the machine's rate."""


def signature() -> dict[str, Any]:
    """What the measured rates depend on: the CPU, the cores we may use, torch and its threads."""
    cpu = cpu_features()
    return {"cpu": cpu.model, "flags": cpu.present, "usable_cores": cpu.usable_cores,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def cache_path(cache_dir: str | Path | None = None) -> Path:
    from .config import default_cache_dir

    key = hashlib.sha256(json.dumps(signature(), sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / "hardware" / f"{key}.json"


def _cached(cache_dir: str | Path | None, section: str, entry: str, measure: Callable[[], dict]) -> dict[str, Any]:
    """`section[entry]` from the cache file, measured and stored when missing (an unreadable file is a miss)."""
    path = cache_path(cache_dir)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored.get(section), dict):
        stored[section] = {}
    if entry not in stored[section]:
        from .measure import load_snapshot

        # The load says whether others shared the cores: a busy machine measures low.
        stored[section][entry] = dict(measure(), load_at_start=load_snapshot())
        stored["signature"] = signature()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return stored[section][entry]


def _best_seconds(work: Callable[[], Any], repeats: int, min_seconds: float = 0.0) -> tuple[float, int]:
    """Fastest of at least `repeats` timed runs (and of as many as fit in `min_seconds`), and the count."""
    work()  # warm-up: first-touch page faults and kernel selection are not the rate
    best, runs, began = float("inf"), 0, time.perf_counter()
    while runs < repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        work()
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return best, runs


def measure_gemm(dtype: torch.dtype, n: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    seconds, _ = _best_seconds(lambda: torch.matmul(a, b), repeats)
    return {"flops": 2 * n ** 3 / seconds, "n": n, "repeats": repeats, "best_seconds": seconds}


def gemm_rates(cache_dir: str | Path | None = None, n: int = GEMM_SIZE) -> dict[str, Any]:
    """Measured matmul FLOP/s per dtype ('fp32', and 'bf16' or None where the CPU has no native bf16)."""
    rates = {"fp32": _cached(cache_dir, "gemm", f"fp32:{n}", lambda: measure_gemm(torch.float32, n)),
             "bf16": _cached(cache_dir, "gemm", f"bf16:{n}", lambda: measure_gemm(torch.bfloat16, n))
             if native_bf16() else None}
    return dict(rates, threads=torch.get_num_threads(),
                method=f"best of {GEMM_REPEATS} torch.matmul of {n}x{n} after a warm-up, 2n^3 FLOPs; "
                       f"bf16 only with native bf16; cached in {cache_path(cache_dir)}")


def measure_read_bandwidth(working_set_bytes: int, repeats: int = BANDWIDTH_REPEATS) -> dict[str, Any]:
    """Best rate over 1 thread and the configured threads: a multi-threaded reduction over a small buffer
    waits on every thread, and on a shared machine one descheduled thread stalls it (measured here under
    load: 0.05 GB/s on 2 threads against 77 GB/s on one, for 1 MiB)."""
    if working_set_bytes < 4:
        raise ValueError(f"the working set must hold at least one float32, got {working_set_bytes} bytes")
    buffer = torch.ones(working_set_bytes // 4, dtype=torch.float32)
    configured = torch.get_num_threads()
    best: dict[str, Any] = {}
    try:
        for threads in sorted({1, configured}):
            torch.set_num_threads(threads)
            seconds, runs = _best_seconds(lambda: buffer.sum(), repeats, BANDWIDTH_MIN_SECONDS)
            if not best or seconds < best["best_seconds"]:
                best = {"gb_per_s": buffer.numel() * 4 / seconds / 1e9, "bytes": buffer.numel() * 4,
                        "repeats": runs, "best_seconds": seconds, "threads": threads}
    finally:
        torch.set_num_threads(configured)
    return best


def read_bandwidth_gbs(working_set_bytes: int, cache_dir: str | Path | None = None) -> float:
    """Measured read bandwidth (GB/s, 1e9 bytes) when streaming a buffer of `working_set_bytes`."""
    entry = _cached(cache_dir, "read_bandwidth", str(int(working_set_bytes)),
                    lambda: measure_read_bandwidth(int(working_set_bytes)))
    return float(entry["gb_per_s"])


def utilization(achieved_flops: float, computed_peak: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """Achieved FLOP/s as a fraction of the computed peaks and of the measured GEMM rates, per dtype."""
    out: dict[str, Any] = {"achieved_flops": achieved_flops}
    for dtype in ("fp32", "bf16"):
        out[f"of_computed_{dtype}_peak"] = achieved_flops / computed_peak[f"{dtype}_flops"]
        rate = measured.get(dtype)
        out[f"of_measured_{dtype}_gemm"] = achieved_flops / rate["flops"] if rate else None
    return out
