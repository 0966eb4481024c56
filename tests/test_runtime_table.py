"""The runtime table: quality classes, a winner only when the paired interval says so, and the bound."""
from __future__ import annotations

import pytest

from ryzen_core.measure import compare_pairs
from ryzen_core.runtime_table import plot_runtime, quality_class, runtime_markdown, runtime_table

BASE = [100.0, 102.0, 98.0, 101.0, 99.0, 100.0]


def _batch(size: int, rates: dict[str, list[float]]) -> dict:
    backends = {name: {"decode_tokens_per_s": {"p50": sorted(v)[len(v) // 2]}, "prefill_tokens_per_s": {"p50": 1000.0},
                       "ttft_ms": {"p50": 2.0}, "memory": {"peak_rss_mib": 300.0 + i},
                       "export_fidelity": {"token_agreement": 1.0}}
                for i, (name, v) in enumerate({"torch": BASE, **rates}.items())}
    comparisons = {name: {"decode_tokens_per_s": compare_pairs(BASE, v, True).to_dict()} for name, v in rates.items()}
    return {"batch_size": size, "backends": backends, "comparisons": comparisons}


def _report(rates: dict[str, list[float]]) -> dict:
    return {"baseline": "torch", "backends": ["torch", *rates], "config": {"prompt_len": 32, "new_tokens": 32},
            "perplexity": {"torch": 10.0, **{name: 10.0 + i for i, name in enumerate(rates)}},
            "batches": [_batch(1, rates), _batch(8, {n: [8 * x for x in v] for n, v in rates.items()})]}


FACTS = {"torch": {"precision": "fp32", "weight_bytes": 4_000_000, "kv_bytes_per_position": 1000},
         "ort-fp32": {"precision": "fp32", "weight_bytes": 4_000_000, "kv_bytes_per_position": 1000},
         "ort-int8": {"precision": "int8", "weight_bytes": 1_000_000},
         "gguf-q8": {"precision": "Q8_0", "weight_bytes": 1_100_000},
         "mystery": {}}


def _bandwidth(working_set: int) -> float:
    assert working_set & (working_set - 1) == 0  # rounded to a power of two
    return 10.0  # GB/s


@pytest.mark.parametrize("precision, expected", [("fp32", "fp32-exact"), ("float32", "fp32-exact"), ("F16", "16-bit"),
                                                 ("Q8_0", "8-bit"), ("int8", "8-bit"), ("int4", "4-bit"),
                                                 ("Q4_0", "4-bit"), ("TQ2_0", "ternary"), ("ternary", "ternary"), (None, "other"), ("weird", "other")])
def test_quality_class(precision, expected):
    assert quality_class(precision) == expected


def test_a_clear_leader_is_recommended_with_its_interval():
    rates = {"ort-fp32": [150.0, 151, 149, 152, 150, 148], "ort-int8": [300.0, 305, 298, 302, 301, 299],
             "gguf-q8": [200.0, 204, 197, 201, 200, 202], "mystery": [120.0] * 6}
    table = runtime_table(_report(rates), FACTS, bandwidth=_bandwidth)
    assert list(table["classes"]) == ["fp32-exact", "8-bit", "other"]
    eight = table["classes"]["8-bit"]
    assert eight["ranking"] == ["ort-int8", "gguf-q8"]
    pair = eight["leader_vs_runner_up"][1]
    assert pair["verdict"] == "faster" and pair["ci_low"] > 1.0 and 1.45 < pair["median_ratio"] < 1.55
    assert eight["recommendation"].startswith("fastest 8-bit path on this machine at batch 1: ort-int8, 1.")
    assert table["classes"]["fp32-exact"]["ranking"] == ["ort-fp32", "torch"]
    assert table["classes"]["other"]["recommendation"] == "only mystery in the other class on this machine"


def test_indistinguishable_backends_get_no_winner():
    rates = {"ort-int8": [200.0, 190, 210, 195, 205, 200], "gguf-q8": [195.0, 205, 190, 210, 200, 196]}
    table = runtime_table(_report(rates), FACTS, bandwidth=_bandwidth)
    recommendation = table["classes"]["8-bit"]["recommendation"]
    assert "not distinguishable" in recommendation and "no measurable difference" in recommendation


def test_bound_counts_weights_and_the_kv_cache_at_the_mean_context():
    table = runtime_table(_report({"ort-fp32": [150.0] * 6}), FACTS, bandwidth=_bandwidth)
    row = next(r for r in table["rows"] if r["backend"] == "ort-fp32")
    per_token = 4_000_000 + 1000 * (32 + 16)
    assert row["bound"]["bytes_per_token"] == per_token
    assert row["bound"]["working_set_bytes"] == 4 * 1024 * 1024
    assert row["bound"]["fraction_of_bound"] == pytest.approx(150.0 * per_token / 10e9)
    assert next(r for r in table["rows"] if r["backend"] == "torch")["bound"]["bound_tokens_per_s"] == \
        pytest.approx(10e9 / per_token)


def test_markdown_and_plot(tmp_path):
    rates = {"ort-fp32": [150.0] * 6, "ort-int8": [300.0, 305, 298, 302, 301, 299], "gguf-q8": [200.0] * 6}
    table = runtime_table(_report(rates), FACTS, bandwidth=_bandwidth)
    text = runtime_markdown(table)
    assert "### 8-bit" in text and "**fastest 8-bit path" in text and "| ort-int8 | int8 | 301 | 2,408 |" in text
    assert "reads 3.86 MiB/token" in text
    plot_runtime(table, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
