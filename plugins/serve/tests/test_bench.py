"""`ryzen bench serve`: registered under the core's bench group; only loopback URLs; the figures it
computes from request timings; and a small mixed load (malformed requests, clients that disconnect
mid-stream) against servers it starts itself from a run directory, batched and batch 1."""
from __future__ import annotations

import json

import click
import pytest

from ryzen_plugin_serve import plugin
from ryzen_plugin_serve.bench import LoadSettings, greedy_identity, summarize
from ryzen_plugin_serve.loadgen import MALFORMED, Mix, RequestResult, plan_requests


@pytest.fixture
def bench_serve(ryzen):
    return lambda *args: ryzen("bench", "serve", *args)


def test_bench_serve_joins_the_core_bench_group_or_stands_alone_without_one(bench_serve):
    result = bench_serve("--help")
    assert result.exit_code == 0 and "loopback" in result.output

    @click.group()
    def bare():
        pass

    plugin.register_commands(bare)
    assert {"serve", "serve-bench"} <= set(bare.commands)


@pytest.mark.parametrize("target", ["http://example.com:8000", "http://10.1.2.3:8000", "http://0.0.0.0:8000",
                                    "ftp://127.0.0.1/", "not-a-directory"])
def test_targets_other_than_loopback_urls_and_run_directories_are_one_line_exit_2(bench_serve, target):
    result = bench_serve(target, "--requests", "1")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--concurrency", "1.5"], ["--rate", "x"],
                                  ["--concurrency", "2", "--rate", "2"],
                                  ["--malformed-fraction", "0.8", "--disconnect-fraction", "0.5"]])
def test_bad_load_options_are_one_line_exit_2(bench_serve, args, tmp_path):
    result = bench_serve(str(tmp_path), *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output


def test_the_same_seed_plans_the_same_mixed_requests_and_the_fractions_hold_roughly():
    mix = Mix(malformed=0.1, disconnect=0.05)
    first, again = (plan_requests(2000, "m", 4, mix, seed=3) for _ in range(2))
    assert first == again
    kinds = [s.kind.split(":")[0] for s in first]
    assert 150 < kinds.count("malformed") < 250 and 60 < kinds.count("disconnect") < 140
    assert {s.kind.split(":")[1] for s in first if s.kind.startswith("malformed:")} == set(MALFORMED)


SETTINGS = LoadSettings("concurrency", (1,), 4, 60, 1, 8, Mix(), ttft_target_s=0.1, e2e_target_s=1.0)


def test_summary_pools_latencies_counts_goodput_and_errors_by_kind():
    results = [
        RequestResult(0, "normal", "a", 200, None, ttft_s=0.05, e2e_s=0.5, gaps_s=[0.01, 0.03], tokens=3, text="x"),
        RequestResult(1, "normal", "b", 200, None, ttft_s=0.2, e2e_s=0.9, gaps_s=[0.02], tokens=2, text="y"),
        RequestResult(2, "normal", "c", 429, "http_429", e2e_s=0.01),
        RequestResult(3, "malformed:bad_json", "d", 400, None, e2e_s=0.01),
        RequestResult(4, "malformed:huge_max_tokens", "e", 500, "http_500", e2e_s=0.01),
        RequestResult(5, "disconnect", "f", 200, None, ttft_s=0.05, e2e_s=0.05),
    ]
    s = summarize(results, wall_s=2.0, settings=SETTINGS)
    assert s["completed"] == 2 and s["requests_per_s"] == 1.0 and s["tokens_per_s"] == 2.5
    assert s["goodput_rps"] == 0.5 and s["goodput_fraction"] == pytest.approx(1 / 3)  # TTFT 0.2 s misses 0.1 s
    assert s["errors"] == {"http_429": 1, "http_500": 1} and s["status_5xx"] == 1
    assert s["malformed"] == {"sent": 2, "got_4xx": 1} and s["disconnected"] == 1
    assert s["ttft_ms"]["p50"] == pytest.approx(125) and s["itl_ms"]["p50"] == pytest.approx(20)
    assert s["e2e_ms"]["p99"] <= 900


def test_greedy_identity_pairs_requests_by_index_and_names_the_prompts_that_differ():
    a = [RequestResult(i, "normal", p, 200, text=t) for i, (p, t) in enumerate([("p", "x"), ("q", "y"), ("r", "z")])]
    b = [RequestResult(0, "normal", "p", 200, text="x"), RequestResult(1, "normal", "q", 200, text="Y"),
         RequestResult(2, "normal", "r", 500, error="http_500")]
    assert greedy_identity(a, b) == {"compared": 2, "identical": 1, "differing_prompts": ["q"]}


def test_a_small_mixed_load_on_batched_and_batch_1_servers_has_no_5xx_and_answers_every_good_request(
        bench_serve, trained_run, tmp_path):
    out = tmp_path / "bench"
    result = bench_serve(str(trained_run), "--concurrency", "8", "--requests", "50", "--rounds", "2",
                         "--max-tokens", "3", "--malformed-fraction", "0.1", "--disconnect-fraction", "0.05",
                         "--threads", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench_serve.json").read_text())
    assert set(report["servers"]) == {"batch 8", "batch 1"}
    for label, r in report["robustness"].items():
        assert r["requests"] == 100 and r["status_5xx"] == 0, (label, r)
        assert r["well_formed_answered"] == r["well_formed_sent"] > 0
        assert r["malformed_got_4xx"] == r["malformed_sent"] > 0 and r["disconnected"] > 0
        assert r["slots_freed_after_every_load"] and r["health_after"] == 200 and r["process_alive"]
        assert r["exit_code"] == 0
    (level,) = report["levels"]
    assert level["ratio"]["n"] == 2 and level["ratio"]["median_ratio"] > 0
    identity = level["greedy_identity"]
    assert identity["identical"] == identity["compared"] > 0, identity["differing_prompts"]
    assert level["servers"]["batch 1"]["mean_batch"] == 1.0
    assert (out / "bench_serve.png").stat().st_size > 0 and "| ratio |" in (out / "bench_serve.md").read_text()
    assert "round 2/2" in result.stderr  # progress lines while it runs
