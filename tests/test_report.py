"""report.md sections: the training table's decimals, quality against the baseline, what each plugin recorded."""
from __future__ import annotations

from ryzen_core.config import RunConfig
from ryzen_core.plugins import PluginHost
from ryzen_core.report import events_markdown, fixed, quality_table
from ryzen_core.run import training_report

ENV = {"cpu": {"model": "test CPU", "usable_cores": 2}, "versions": {"torch": "2.x", "onnxruntime": None}}


def summary(val_loss, test_ppl, **extra):
    return dict(steps=300, tokens=614400, median_tokens_per_s=13300.4, final_val_loss=val_loss,
                test_perplexity=test_ppl, unigram_perplexity=513.3, peak_rss_mb=648.2, stopped_because="budget",
                **extra)


def test_fixed_decimals_and_missing_values():
    assert fixed(3.99157, 4) == "3.9916" and fixed(107.4, 2) == "107.40" and fixed(614400, 0) == "614,400"
    assert fixed(-0.0123, 4, signed=True) == "-0.0123" and fixed(0.5, 2, signed=True) == "+0.50"
    assert fixed(None, 2) == "-" and fixed(float("nan"), 2) == "-"


def test_quality_table_shows_each_variant_against_the_baseline():
    table = quality_table({"baseline": summary(4.0, 100.0), "optimized": summary(3.9, 95.0),
                           "only-kernel": summary(4.02, 102.0)})
    rows = table.splitlines()
    assert rows[0] == "| run | val loss | vs baseline | test ppl | vs baseline | test ppl change [95% interval] |"
    assert rows[2] == "| baseline | 4.0000 | - | 100.00 | - | - |"
    assert rows[3] == "| optimized | 3.9000 | -0.1000 (-2.50%) | 95.00 | -5.00 (-5.00%) | - |"
    assert rows[4] == "| only-kernel | 4.0200 | +0.0200 (+0.50%) | 102.00 | +2.00 (+2.00%) | - |"
    assert quality_table({"baseline": summary(4.0, 100.0)}) is None  # nothing to compare
    assert "| optimized | - | - |" in quality_table({"baseline": summary(4.0, 100.0), "optimized": summary(None, 90.0)})


def test_test_perplexity_change_has_an_interval_over_the_paired_test_batches():
    base = [4.0, 4.2, 3.9, 4.1, 4.0, 4.3]
    better = [loss - 0.05 + 0.01 * (i % 2) for i, loss in enumerate(base)]  # every batch lower
    same = [loss + (0.01 if i % 2 else -0.01) for i, loss in enumerate(base)]  # up and down
    table = quality_table({"baseline": summary(4.0, 100.0, test_batch_losses=base),
                           "better": summary(3.95, 95.0, test_batch_losses=better),
                           "same": summary(4.0, 100.0, test_batch_losses=same)})
    better_row = next(r for r in table.splitlines() if r.startswith("| better"))
    same_row = next(r for r in table.splitlines() if r.startswith("| same"))
    low, high = (float(v.strip(" %|]")) for v in better_row.rsplit("[", 1)[1].split(","))
    assert high < 0  # the whole interval says lower perplexity
    low, high = (float(v.strip(" %|]")) for v in same_row.rsplit("[", 1)[1].split(","))
    assert low < 0 < high  # no change: the interval straddles zero


def test_events_are_listed_per_plugin_with_their_fields_and_capped_per_kind():
    host = PluginHost()
    for epoch in range(7):
        host.recorder("smoothing", "on_epoch_end")("adapted", epoch=epoch, amount=0.2 / (epoch + 1))
    host.recorder("kernel", "on_model_load")("autotune", chosen={"precision": "bf16"}, trials=[1, 2, 3],
                                             note="x" * 200)
    text = events_markdown([e.__dict__ for e in host.events])
    assert "**smoothing** (7 events)" in text and "**kernel** (1 events)" in text
    assert "- `adapted` in on_epoch_end: epoch=0, amount=0.2" in text
    assert "epoch=4" in text and "epoch=5" not in text and "- `adapted`: 2 more" in text
    assert "chosen={precision}, trials=[3 items], note=" + "x" * 77 + "..." in text
    assert events_markdown([]) is None


def test_training_report_has_quality_and_events_sections():
    host = PluginHost()
    host.recorder("smoothing", "on_epoch_end")("adapted", amount=0.1)
    config = RunConfig()
    config.plugins = ["smoothing"]
    report = training_report(config, {"baseline": summary(4.0, 100.0), "optimized": summary(3.9, 95.0)}, host, ENV)
    assert "| baseline | 300 | 614,400 | 13,300 | 4.0000 | 100.00 | 513.30 | 648 | budget |" in report
    assert "## Quality against the baseline" in report and "| optimized | 3.9000 | -0.1000 (-2.50%)" in report
    assert "## What each plugin recorded" in report and "- `adapted` in on_epoch_end: amount=0.1" in report
    alone = training_report(RunConfig(), {"train": summary(4.0, 100.0)}, PluginHost(), ENV)
    assert "Quality against the baseline" not in alone and "What each plugin recorded" not in alone


def test_loss_plot_draws_overlapping_runs_and_their_difference(tmp_path):
    from types import SimpleNamespace

    from ryzen_core.report import plot_loss_curves

    def run(offset):
        steps = [{"loss": 5.0 - 0.01 * s + offset, "tokens": 100 * s} for s in range(1, 40)]
        evals = [{"step": s, "tokens": 100 * s, "val_loss": 5.0 - 0.01 * s + offset} for s in (10, 20, 30)]
        return SimpleNamespace(steps=steps, evals=evals)

    path = tmp_path / "loss.png"
    plot_loss_curves({"baseline": run(0.0), "optimized": run(0.0), "only-x": run(-0.05)}, path)
    assert path.stat().st_size > 10_000
