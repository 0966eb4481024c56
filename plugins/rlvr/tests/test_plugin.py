"""The plugin through the core: settings, the task forward in the core Trainer (phases, checkpoints,
resume, adaptation), `ryzen run --plugins rlvr`, and the `ryzen rlvr` commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ryzen_core import ConfigError, hookimpl
from ryzen_core.plugins import PluginHost
from ryzen_core.run import prepare
from ryzen_plugin_rlvr import plugin

SMALL_EVAL = ["rlvr.eval_problems=12", "rlvr.eval_paths=[1,2,4]", "rlvr.paths=4", "rlvr.throughput_prompts=2",
              "rlvr.throughput_repeats=1", "rlvr.monitor_problems=8", "rlvr.sft_batch=16", "rlvr.group_prompts=4",
              "rlvr.group_size=4", "rlvr.min_group_size=2"]
TASK_MODEL = ["model.preset=tiny", "model.context_length=48", "model.d_model=32", "data.seq_len=32",
              "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
              "train.checkpoint_every=2", "train.threads=1"]


def _host() -> PluginHost:
    host = PluginHost()
    host.register(plugin, "rlvr")
    return host


def _config(host, tmp_path, *extra, out="run"):
    return prepare(host, None, [*TASK_MODEL, f"data.cache_dir={tmp_path / 'cache'}", *SMALL_EVAL, *extra], ["rlvr"],
                   tmp_path / out)


def test_settings_reject_unknown_tasks_and_unverifiable_best_of_n(tmp_path):
    host = _host()
    with pytest.raises(ConfigError, match="unknown task"):
        _config(host, tmp_path, "rlvr.task=sudoku")
    with pytest.raises(ConfigError, match="best_of_n"):
        _config(host, tmp_path, "rlvr.selection=best_of_n")
    with pytest.raises(ConfigError, match="digits"):
        _config(host, tmp_path, "rlvr.task_options={digits: 0}")
    assert _config(host, tmp_path, "rlvr.task=countdown", "rlvr.selection=best_of_n").plugins == ["rlvr"]


def _trainer(host, config, run_dir, char_tokenizer, plugins=("rlvr",)):
    from ryzen_core.trainer import Trainer
    from ryzen_plugin_rlvr.pipeline import task_data
    from ryzen_plugin_rlvr.tasks import get_task

    settings = host.settings["rlvr"]
    data = task_data(get_task(settings.task), char_tokenizer, config.data.seq_len, seed=1, train_problems=64,
                     held_out_problems=32)
    return Trainer(config, host, list(plugins), run_dir, data, label="t")


class Interrupt:
    """A plugin that kills training (like Ctrl-C) at the evaluation of one step, before its checkpoint."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def on_epoch_end(self, metrics):
        if metrics["step"] == self.step:
            raise KeyboardInterrupt


def test_sft_then_grpo_in_one_core_training_run_and_resume_is_exact(tmp_path, char_tokenizer):
    # A constant learning rate after warm-up, so a run's schedule does not depend on where it stops.
    run = ["train.max_steps=6", "rlvr.sft_fraction=0.5", "rlvr.kl_coef=0.05", "train.min_lr_ratio=1.0", "rlvr.adapt=false",
           "train.eval_every=1", "train.checkpoint_every=1"]
    host = _host()
    config = _config(host, tmp_path, *run)
    full = _trainer(host, config, tmp_path / "full", char_tokenizer).fit()
    phases = [(e.data["phase"], e.data["step"]) for e in host.events if e.event == "phase"]
    assert phases == [("sft", 0), ("grpo", 3)]
    state = plugin.training_state(full.model)
    assert state.compute.sft_steps == 3 and state.compute.grpo_steps == 3
    assert state.compute.sampled_completions == 3 * 4 * 4 and state.compute.generated_tokens > 0
    assert (Path(config.output.dir) / "rlvr_warmup.safetensors").is_file()
    assert any(e.event == "validation_accuracy" for e in host.events)
    assert any(e.event == "grpo_groups" for e in host.events)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in full.metrics.steps)
    # The GRPO-phase learning rate is the schedule's times grpo_lr_scale, as the trainer logged it.
    assert full.metrics.steps[3]["lr"] == pytest.approx(0.1 * full.metrics.steps[2]["lr"])

    # Killed at step 5 (inside GRPO, after the step-4 checkpoint), then resumed: the same weights.
    host2 = _host()
    host2.register(Interrupt(5), "interrupt")
    config2 = _config(host2, tmp_path, *run, out="run2")
    with pytest.raises(KeyboardInterrupt):
        _trainer(host2, config2, tmp_path / "cut", char_tokenizer, plugins=["rlvr", "interrupt"]).fit()
    host3 = _host()
    resumed = _trainer(host3, _config(host3, tmp_path, *run, out="run2"), tmp_path / "cut", char_tokenizer).fit(
        resume=True)
    assert any(e.event == "reference_loaded" for e in host3.events)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_on_epoch_end_adapts_group_size_and_temperature_and_the_core_records_it(tmp_path, char_tokenizer):
    from ryzen_plugin_rlvr.training import GroupStats

    host = _host()
    config = _config(host, tmp_path, "train.max_steps=2", "rlvr.phase=grpo", "rlvr.monitor_problems=0")
    trainer = _trainer(host, config, tmp_path / "adapt", char_tokenizer)
    state = plugin.training_state(trainer.model)
    record = host.recorder("rlvr", "on_epoch_end")
    state.stats = GroupStats(groups=10, all_wrong=8, completions=40, steps=1)
    assert plugin.on_epoch_end(1, {"step": 5}, trainer.model, host.settings["rlvr"], record) == {"group_size": 8}
    state.stats = GroupStats(groups=10, all_right=9, reward_sum=38, completions=40, steps=1)
    assert plugin.on_epoch_end(2, {"step": 10}, trainer.model, host.settings["rlvr"], record) == \
        {"group_temperature": 1.1}
    state.stats = GroupStats(groups=10, completions=40, reward_sum=20, steps=1)
    assert plugin.on_epoch_end(3, {"step": 15}, trainer.model, host.settings["rlvr"], record) == {"group_size": 4}
    assert host.settings["rlvr"].group_size == 4 and host.settings["rlvr"].group_temperature == 1.1
    # Through the trainer's own evaluation: the change lands in the metrics and the run's events.
    state.stats = GroupStats(groups=10, all_wrong=10, completions=40, steps=1)
    trainer._evaluate_and_adapt()
    assert trainer.metrics.adaptations[-1]["changes"] == {"group_size": 8}
    assert any(e.event == "adapted" and e.plugin == "rlvr" for e in host.events)


def test_ryzen_run_with_rlvr_trains_evaluates_accuracy_vs_n_and_writes_figures(tmp_path):
    from helpers import TINY
    from ryzen_core.run import run_pipeline

    host = _host()
    config = prepare(host, None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "train.threads=1",
                                  "model.context_length=64", *SMALL_EVAL], ["rlvr"], tmp_path / "run")
    run_dir = run_pipeline(config, host)
    report = json.loads((run_dir / "optimized" / "rlvr_report.json").read_text())
    assert [r["decoding"] for r in report["accuracy_vs_n"]] == ["greedy", "N=1", "N=2", "N=4", "N=4 adaptive"]
    assert report["problems"] == 12 and report["throughput"]["identical_paths"]
    assert (run_dir / "optimized" / "rlvr_accuracy_vs_n.png").stat().st_size > 0
    assert "| decoding |" in (run_dir / "optimized" / "rlvr_report.md").read_text()
    analysis = json.loads((run_dir / "optimization_analysis.json").read_text())
    events = {e["event"] for e in analysis["events"] if e["plugin"] == "rlvr"}
    assert {"phase", "accuracy_vs_n", "paths_per_s", "compute", "multipath"} <= events
    validation = json.loads((run_dir / "inference_validation_report.json").read_text())
    assert "torch-optimized" in validation["backends"]  # the multi-path generate was measured


def test_rlvr_train_and_eval_commands(tmp_path):
    from ryzen_core.cli import build_cli

    host = _host()
    cli = build_cli(host)
    out = tmp_path / "task-run"
    sets = [x for s in [*TASK_MODEL, f"data.cache_dir={tmp_path / 'cache'}", *SMALL_EVAL] for x in ("--set", s)]
    result = CliRunner().invoke(cli, ["rlvr", "train", "--out", str(out), "--sft-steps", "4", "--grpo-steps", "2",
                                      *sets], obj={"host": host}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Greedy accuracy after the supervised warm-up" in result.output
    for phase in ("sft", "grpo"):
        assert (out / phase / "metrics.csv").is_file() and (out / phase / "training_checkpoint" / "LATEST").is_file()
    report = json.loads((out / "rlvr_report.json").read_text())
    assert report["compute"]["sft"]["sft_steps"] == 4 and report["compute"]["grpo"]["grpo_steps"] == 2
    assert "warmup_vs_final" in report

    host = _host()
    cli = build_cli(host)
    result = CliRunner().invoke(cli, ["rlvr", "eval", str(out), "--no-throughput", "--out", str(tmp_path / "ev"),
                                      "--set", "rlvr.eval_paths=[1,2]"], obj={"host": host}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "ev" / "rlvr_report.json").read_text())
    greedy = [r for r in report["accuracy_vs_n"] if r["decoding"] == "greedy"][0]
    assert [r for r in again["accuracy_vs_n"] if r["decoding"] == "greedy"][0]["correct"] == greedy["correct"]


def test_grpo_learning_rate_is_scaled_once_per_optimizer_step(tmp_path, char_tokenizer):
    host = _host()
    config = _config(host, tmp_path, "train.max_steps=2", "rlvr.phase=grpo", "rlvr.grpo_lr_scale=0.25")
    trainer = _trainer(host, config, tmp_path / "lr", char_tokenizer)
    state = plugin.training_state(trainer.model)
    groups = trainer.optimizer.param_groups
    groups[0]["lr"] = groups[1]["lr"] = 0.004
    state._scale_lr()
    state._scale_lr()  # a second micro-batch of the same step
    assert [g["lr"] for g in groups] == [0.001, 0.001]
    groups[0]["lr"] = groups[1]["lr"] = 0.002  # the scheduler's rate for the next step
    state._scale_lr()
    assert [g["lr"] for g in groups] == [0.0005, 0.0005]


def test_a_sampled_grpo_batch_is_reused_for_updates_per_batch_updates(tmp_path, char_tokenizer):
    host = _host()
    config = _config(host, tmp_path, "train.max_steps=4", "rlvr.phase=grpo", "rlvr.updates_per_batch=2",
                     "rlvr.adapt=false", "rlvr.monitor_problems=0", "train.eval_every=4")
    result = _trainer(host, config, tmp_path / "reuse", char_tokenizer).fit()
    compute = plugin.training_state(result.model).compute
    assert compute.grpo_steps == 4
    assert compute.sampled_completions == 2 * 4 * 4  # two sampled batches of 4 prompts x 4 completions
