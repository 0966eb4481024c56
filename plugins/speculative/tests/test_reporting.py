"""What speculative decoding records while it is measured in a worker process reaches the run's report,
and `ryzen bench infer` validates the variant again although it shared the baseline's weights."""
from __future__ import annotations

import json

import pytest

from ryzen_core.testing import tiny_sets


@pytest.mark.slow
def test_worker_generation_events_reach_the_report_and_bench_infer_measures_the_variant(ryzen_cli, tmp_path):
    run = tmp_path / "run"
    result = ryzen_cli("run", "--plugins", "speculative", *tiny_sets(), "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads((run / "optimization_analysis.json").read_text())["events"]
    generations = [e for e in events if e["plugin"] == "speculative" and e["event"] == "generation"]
    assert generations, "no acceptance figures came back from the validation worker"
    assert all("acceptance_rate" in e["data"] or "target_forwards_per_token" in e["data"] for e in generations)

    out = tmp_path / "again.json"
    again = ryzen_cli("bench", "infer", str(run), "--json-out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "torch-optimized" in json.loads(out.read_text())["backends"]
