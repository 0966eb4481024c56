"""`ryzen bench`: the structure and arithmetic of the benchmark results (not their speed)."""
from __future__ import annotations

import json

from helpers import tiny_sets
from ryzen_core.bench import peak_flops


def test_peak_flops_follows_the_formula():
    peak = peak_flops()
    per_cycle = 2 * peak["vector_lanes_fp32"] * peak["fma_units_assumed"]
    assert peak["fp32_flops"] == peak["cores"] * peak["clock_hz"] * per_cycle
    assert peak["bf16_flops"] >= peak["fp32_flops"]


def test_bench_train_pairs_rounds_and_reports_mfu(ryzen, tmp_path):
    out = tmp_path / "bench.json"
    result = ryzen("bench", "train", "--plugins", "compression", *tiny_sets(), "--rounds", "2", "--max-rounds", "3",
                   "--steps", "1", "--json-out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"baseline", "candidate"}
    assert data["runs"]["candidate"]["plugins"] == ["compression"]
    speedup = data["speedup"]
    assert speedup["n"] == data["rounds"] in (2, 3) and len(speedup["ratios"]) == speedup["n"]
    assert speedup["ci_low"] <= speedup["median_ratio"] <= speedup["ci_high"] and speedup["ci_level"] == 0.95
    base = data["runs"]["baseline"]
    achieved = base["tokens_per_s"]["p50"] * data["flops_per_token"]
    assert base["mfu_fp32_peak"] == achieved / data["peak"]["fp32_flops"]
    assert base["utilization"]["of_measured_fp32_gemm"] == achieved / data["measured_gemm"]["fp32"]["flops"]
    assert isinstance(data["conditions"]["busy"], bool)
    assert "Speedup (median of per-round ratios, 95% interval)" in result.stdout
    assert "of measured fp32 GEMM" in result.stdout and "Measured 2048x2048 matmul" in result.stdout


def test_bench_infer_measures_a_finished_run_again(ryzen, tmp_path):
    run = tmp_path / "run"
    assert ryzen("train", *tiny_sets(), "--out", str(run)).returncode == 0
    out = tmp_path / "infer.json"
    result = ryzen("bench", "infer", str(run), "--json-out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["backends"] == ["torch"] and report["perplexity"]["torch"] > 1
    empty = ryzen("bench", "infer", str(tmp_path))
    assert empty.returncode != 0 and "Traceback" not in empty.stderr
