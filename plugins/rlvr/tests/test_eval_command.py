"""`ryzen rlvr eval`: a run that is not an rlvr run is refused at once, writing nothing; the evaluation
shows its progress."""
from __future__ import annotations

from ryzen_core.testing import tiny_sets


def test_rlvr_eval_of_a_run_without_rlvr_is_refused_without_writing(tmp_path, ryzen_cli):
    run_dir = tmp_path / "run"
    only_rlvr = {"RYZEN_LOAD_PLUGINS": "rlvr"}
    trained = ryzen_cli("train", "--out", str(run_dir), *tiny_sets(), env=only_rlvr)
    assert trained.returncode == 0, trained.stderr
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = ryzen_cli("rlvr", "eval", str(run_dir), "--no-throughput", "--set", "rlvr.eval_problems=4",
                       "--set", "rlvr.eval_paths=[1]", env=only_rlvr)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"{run_dir} is not an rlvr run (its plugins: none)" in result.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before

    not_a_run = ryzen_cli("rlvr", "eval", str(tmp_path), env=only_rlvr)
    assert not_a_run.returncode == 2 and not_a_run.stderr == f"Error: {tmp_path} is not a run directory (no config.json)\n"


def test_accuracy_vs_n_logs_each_decoding_off_a_terminal(tiny_model, char_tokenizer, caplog, monkeypatch):
    import logging

    from ryzen_plugin_rlvr.evaluate import accuracy_vs_n
    from ryzen_plugin_rlvr.sampling import TaskCodec
    from ryzen_plugin_rlvr.tasks import get_task

    monkeypatch.setenv("CI", "1")
    caplog.set_level(logging.INFO)
    task = get_task("arithmetic")
    accuracy_vs_n(tiny_model, TaskCodec(char_tokenizer), task, task.problems(2, seed=1, split="test"), ns=(1, 2),
                  adaptive_n=None, max_new_tokens=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "ryzen_core.progress"]
    assert lines == [f"rlvr eval on 2 problems decoding {n}/3" for n in (1, 2, 3)]
