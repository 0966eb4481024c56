"""Progress on every long phase: a log line every ~10% off a terminal; `ryzen train` shows its test
evaluation and writes report.md."""
from __future__ import annotations

import logging

from helpers import tiny_sets
from ryzen_core.progress import Progress, progress


def logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ryzen_core.progress"]


def test_off_a_terminal_progress_logs_the_first_unit_and_every_tenth(caplog, monkeypatch):
    monkeypatch.setenv("CI", "1")
    caplog.set_level(logging.INFO)
    with Progress("export", 40, unit="file") as bar:
        for _ in range(40):
            bar.update(loss="1.5")
    assert logged(caplog) == ["export file 1/40 loss 1.5"] + [f"export file {n}/40 loss 1.5" for n in range(4, 41, 4)]
    caplog.clear()
    assert list(progress(iter("abc"), "letters", unit="letter")) == ["a", "b", "c"]
    assert logged(caplog) == ["letters letter 1/3", "letters letter 2/3", "letters letter 3/3"]


def test_disabled_progress_is_silent(caplog, monkeypatch):
    monkeypatch.setenv("CI", "1")
    caplog.set_level(logging.INFO)
    with Progress("rank 1", 5, enabled=False) as bar:
        for _ in range(5):
            bar.update()
    assert logged(caplog) == []


def test_ryzen_train_shows_test_evaluation_progress_and_writes_report_md(ryzen, tmp_path):
    out = tmp_path / "run"
    result = ryzen("train", *tiny_sets(), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train test perplexity batch 1/2" in result.stderr and "train test perplexity batch 2/2" in result.stderr
    assert "train step 6/6 loss" in result.stderr
    report = (out / "report.md").read_text()
    assert "## Training" in report and "| train |" in report and "![loss curves](loss_curves.png)" in report
    assert (out / "environment.json").is_file()


def test_ryzen_run_shows_validation_progress(ryzen, tmp_path):
    result = ryzen("run", *tiny_sets(), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation perplexity backend 1/1" in result.stderr
    assert "validation, batch size 1 round 1/" in result.stderr
