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
    result = ryzen("bench", "train", "--plugins", "compression", *tiny_sets(), "--rounds", "2", "--steps", "1",
                   "--json-out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"baseline", "candidate"}
    assert data["runs"]["candidate"]["plugins"] == ["compression"]
    assert data["speedup"]["n"] == 2 and len(data["speedup"]["ratios"]) == 2
    base = data["runs"]["baseline"]
    assert base["mfu_fp32_peak"] == base["tokens_per_s"]["p50"] * data["flops_per_token"] / data["peak"]["fp32_flops"]
    assert "Speedup (median of per-round ratios)" in result.stdout


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
