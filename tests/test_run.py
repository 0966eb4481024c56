"""`ryzen run` end to end on a tiny model: the example plugin installed with pip, hook order,
the run directory, and the fallback for a plugin that breaks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, make_distribution, tiny_sets

EXAMPLE = REPO / "examples" / "ryzen-plugin-label-smoothing"


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """The example plugin installed by pip into its own directory, as a user would install it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    return target


def test_example_plugin_is_discovered_and_its_hooks_run_in_order(ryzen, example_installed, tmp_path):
    env = {"PYTHONPATH": str(example_installed)}
    listing = {r["name"]: r for r in json.loads(ryzen("plugins", "--json", env=env).stdout)}
    assert listing["smoothing"]["distribution"] == "ryzen-plugin-label-smoothing"
    out = tmp_path / "run"
    result = ryzen("run", "--plugins", "smoothing", *tiny_sets("smoothing.amount=0.2"), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = json.loads((out / "optimization_analysis.json").read_text())
    hooks = [e["hook"] for e in analysis["events"] if e["plugin"] == "smoothing"]
    assert hooks == ["on_model_load", "transform_forward", "on_train_start", "on_epoch_end", "on_epoch_end",
                     "on_train_end"]
    assert analysis["settings"]["smoothing"]["amount"] == pytest.approx(0.05)  # 0.2 halved at each of 2 evaluations
    assert json.loads((out / "optimized" / "label_smoothing.json").read_text())["final_amount"] == pytest.approx(0.05)
    for name in ("training_metrics_report.json", "inference_validation_report.json", "environment.json",
                 "report.md", "loss_curves.png", "inference_validation.png", "metrics_baseline.csv",
                 "metrics_optimized.csv"):
        assert (out / name).is_file(), name
    assert "## smoothing (optimized)\n\nLabel smoothing ended at 0.05" in (out / "report.md").read_text()
    training = json.loads((out / "training_metrics_report.json").read_text())["runs"]
    # Label smoothing changes the training loss, so the two runs must differ.
    assert training["baseline"]["summary"]["final_train_loss"] != training["optimized"]["summary"]["final_train_loss"]
    validation = json.loads((out / "inference_validation_report.json").read_text())
    assert validation["backends"] == ["torch", "torch-optimized"]
    assert "torch-optimized" in validation["batches"][0]["comparisons"]


RAISES = """
from ryzen_core import hookimpl

@hookimpl
def transform_forward(forward):
    def broken(input_ids, targets):
        raise RuntimeError("fused kernel missing")
    return broken
"""


def test_plugin_raising_inside_its_forward_is_disabled_and_the_run_completes(ryzen, tmp_path):
    make_distribution(tmp_path, "ryzen-plugin-raiser", "raiser", "ryzen_raiser_mod", RAISES)
    out = tmp_path / "run"
    result = ryzen("run", "--plugins", "raiser", *tiny_sets(), "--out", str(out), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = json.loads((out / "optimization_analysis.json").read_text())
    assert analysis["disabled"] == {"raiser": "transform_forward: forward raised RuntimeError: fused kernel missing"}
    report = (out / "report.md").read_text()
    assert "## Plugins disabled during the run" in report and "fused kernel missing" in report
    steps = json.loads((out / "training_metrics_report.json").read_text())["runs"]["optimized"]["summary"]["steps"]
    assert steps == 6
