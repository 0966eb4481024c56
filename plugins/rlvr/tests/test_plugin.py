"""The plugin through the core: settings, the task forward in the core Trainer (phases, the GRPO learning
rate, checkpoints, resume through state_dict, adaptation), state per variant, `ryzen run --plugins rlvr`,
and the `ryzen rlvr` commands."""
from __future__ import annotations

import json

import pytest
import torch

from ryzen_core import Adaptation, ConfigError, Trainer, hookimpl
from ryzen_core.testing import tiny_sets
from ryzen_plugin_rlvr.pipeline import task_data
from ryzen_plugin_rlvr.plugin import RlvrPlugin
from ryzen_plugin_rlvr.settings import rlvr_settings
from ryzen_plugin_rlvr.tasks import get_task
from ryzen_plugin_rlvr.training import WARMUP_FILE, GroupStats

SMALL_EVAL = ["rlvr.eval_problems=12", "rlvr.eval_paths=[1,2,4]", "rlvr.paths=4", "rlvr.throughput_prompts=2",
              "rlvr.throughput_repeats=1", "rlvr.monitor_problems=8", "rlvr.sft_batch=16", "rlvr.group_prompts=4",
              "rlvr.group_size=4", "rlvr.min_group_size=2"]
TASK_MODEL = ["model.context_length=48", "model.d_model=32", "train.warmup_steps=1", "train.eval_every=2",
              "train.eval_batches=1", "train.checkpoint_every=2", "train.threads=1"]
# A constant learning rate after warm-up, so a run's schedule does not depend on where it stops.
CONSTANT_LR = ["train.min_lr_ratio=1.0", "train.eval_every=1", "train.checkpoint_every=1"]


@pytest.fixture
def rlvr_config(tiny_config):
    def build(*extra):
        return tiny_config(*TASK_MODEL, *SMALL_EVAL, *extra, plugins=["rlvr"])

    return build


@pytest.fixture
def rlvr_host(tiny_host):
    def build(config, **others):
        return tiny_host(config, rlvr=RlvrPlugin, **others)

    return build


def _trainer(host, config, run_dir, char_tokenizer, plugins=("rlvr",), label="t"):
    settings = host.settings["rlvr"]
    data = task_data(get_task(settings.task), char_tokenizer, config.data.seq_len, seed=1, train_problems=64,
                     held_out_problems=32)
    return Trainer(config, host, list(plugins), run_dir, data, label=label)


class Interrupt:
    """A plugin that kills training (like Ctrl-C) at the evaluation of one step, before its checkpoint."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def on_epoch_end(self, metrics):
        if metrics["step"] == self.step:
            raise KeyboardInterrupt


def test_settings_reject_unknown_tasks_and_unverifiable_best_of_n(rlvr_config, rlvr_host):
    with pytest.raises(ConfigError, match="unknown task"):
        rlvr_host(rlvr_config("rlvr.task=sudoku"))
    with pytest.raises(ConfigError, match="best_of_n"):
        rlvr_host(rlvr_config("rlvr.selection=best_of_n"))
    with pytest.raises(ConfigError, match="digits"):
        rlvr_host(rlvr_config("rlvr.task_options={digits: 0}"))
    assert rlvr_host(rlvr_config("rlvr.task=countdown", "rlvr.selection=best_of_n")).settings["rlvr"].task == "countdown"
    # The commands validate a saved config without a host: the same checks, one line naming the key.
    with pytest.raises(ConfigError, match=r"^config error: rlvr\.task: unknown task 'sudoku'"):
        rlvr_settings(rlvr_config("rlvr.task=sudoku"))


def _interrupted_then_resumed(rlvr_config, rlvr_host, char_tokenizer, run_dir, at_step, *settings):
    """Train until the evaluation of `at_step` kills the run, then resume it on a fresh host: its Trainer."""
    config = rlvr_config(*settings)
    host = rlvr_host(config, interrupt=Interrupt(at_step))
    with pytest.raises(KeyboardInterrupt):
        _trainer(host, config, run_dir, char_tokenizer, plugins=["rlvr", "interrupt"]).fit()
    trainer = _trainer(rlvr_host(config), config, run_dir, char_tokenizer)
    trainer.fit(resume=True)
    return trainer


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs after resume"


def test_sft_then_grpo_in_one_core_training_run_and_resume_is_exact(tmp_path, rlvr_config, rlvr_host, char_tokenizer):
    run = ["train.max_steps=6", "rlvr.sft_fraction=0.5", "rlvr.kl_coef=0.05", "rlvr.adapt=false", *CONSTANT_LR]
    config = rlvr_config(*run)
    host = rlvr_host(config)
    full = _trainer(host, config, tmp_path / "full", char_tokenizer).fit()
    phases = [(e.data["phase"], e.data["step"]) for e in host.events if e.event == "phase"]
    assert phases == [("sft", 0), ("grpo", 3)]
    compute = host.instance("rlvr").training.compute
    assert compute.sft_steps == 3 and compute.grpo_steps == 3
    assert compute.sampled_completions == 3 * 4 * 4 and compute.generated_tokens > 0
    assert (tmp_path / "full" / WARMUP_FILE).is_file()  # in the variant's own directory
    assert any(e.event == "validation_accuracy" for e in host.events)
    assert any(e.event == "grpo_groups" for e in host.events)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in full.metrics.steps)
    # The GRPO-phase learning rate is the schedule's times grpo_lr_scale, as the trainer logged it.
    assert full.metrics.steps[3]["lr"] == pytest.approx(0.1 * full.metrics.steps[2]["lr"])

    # Killed at step 5 (inside GRPO, after the step-4 checkpoint), then resumed: the same weights, counters
    # (the plugin's state_dict) and learning rates (the optimizer's, as checkpointed).
    resumed = _interrupted_then_resumed(rlvr_config, rlvr_host, char_tokenizer, tmp_path / "cut", 5, *run)
    events = [e.event for e in resumed.host.events]
    assert "reference_loaded" in events and events.count("phase") == 2  # no phase announced twice
    _assert_same_weights(full.model, resumed.model)
    assert resumed.host.instance("rlvr").training.compute == compute
    assert [s["lr"] for s in resumed.metrics.steps] == [s["lr"] for s in full.metrics.steps]
    assert not resumed.host.disabled


def test_a_grpo_batch_being_reused_survives_a_resume(tmp_path, rlvr_config, rlvr_host, char_tokenizer):
    run = ["train.max_steps=4", "rlvr.phase=grpo", "rlvr.updates_per_batch=2", "rlvr.adapt=false",
           "rlvr.monitor_problems=0", *CONSTANT_LR]
    config = rlvr_config(*run)
    host = rlvr_host(config)
    full = _trainer(host, config, tmp_path / "full", char_tokenizer).fit()
    compute = host.instance("rlvr").training.compute
    assert compute.grpo_steps == 4
    assert compute.sampled_completions == 2 * 4 * 4  # two sampled batches of 4 prompts x 4 completions
    # Killed at step 2: the step-1 checkpoint holds a batch used once, which step 2 must reuse, not resample.
    resumed = _interrupted_then_resumed(rlvr_config, rlvr_host, char_tokenizer, tmp_path / "cut", 2, *run)
    assert resumed.host.instance("rlvr").training.compute == compute
    _assert_same_weights(full.model, resumed.model)


def test_grpo_steps_run_at_the_scaled_rate_once_per_optimizer_step(tmp_path, rlvr_config, rlvr_host, char_tokenizer):
    # One warm-up step then a constant schedule: every step's scheduled rate is train.lr.
    common = ["rlvr.grpo_lr_scale=0.25", "train.grad_accum=2", "rlvr.monitor_problems=0", "rlvr.adapt=false",
              "train.min_lr_ratio=1.0", "train.eval_every=4"]

    def rates(*run):
        config = rlvr_config(*common, *run)
        result = _trainer(rlvr_host(config), config, tmp_path / run[-1], char_tokenizer).fit()
        return config.train.lr, [s["lr"] for s in result.metrics.steps]

    # Switching from the warm-up: the GRPO steps' rates, two micro-batches each, scaled once.
    lr, switched = rates("train.max_steps=4", "rlvr.sft_fraction=0.5")
    assert switched == [lr, lr, pytest.approx(0.25 * lr), pytest.approx(0.25 * lr)]
    # GRPO from the first step: the peak is scaled before the schedule exists, so no step escapes it.
    lr, grpo = rates("train.max_steps=2", "rlvr.phase=grpo")
    assert grpo == [pytest.approx(0.25 * lr)] * 2


def test_on_epoch_end_returns_an_adaptation_that_the_host_applies(tmp_path, rlvr_config, rlvr_host, char_tokenizer):
    config = rlvr_config("train.max_steps=2", "rlvr.phase=grpo", "rlvr.monitor_problems=0")
    host = rlvr_host(config)
    trainer = _trainer(host, config, tmp_path / "adapt", char_tokenizer)
    plugin = host.instance("rlvr")
    record = host.recorder("rlvr", "on_epoch_end")
    expected = [(GroupStats(groups=10, all_wrong=8, completions=40, steps=1), {"group_size": 8}),
                (GroupStats(groups=10, all_right=9, reward_sum=38, completions=40, steps=1), {"group_temperature": 1.1}),
                (GroupStats(groups=10, completions=40, reward_sum=20, steps=1), {"group_size": 4})]
    for epoch, (stats, changes) in enumerate(expected, 1):
        plugin.training.stats = stats
        before = plugin.settings.model_dump()
        adaptation = plugin.on_epoch_end(epoch, {"step": 5 * epoch}, trainer.model, record)
        assert isinstance(adaptation, Adaptation) and adaptation.changes == changes and adaptation.reason
        assert plugin.settings.model_dump() == before  # the plugin proposes; the host applies
        host.apply_adaptation("rlvr", adaptation)
        assert plugin.settings is host.settings["rlvr"] and plugin.training.settings is plugin.settings
    assert plugin.settings.group_size == 4 and plugin.settings.group_temperature == 1.1

    # Through the trainer: a random model gets every group wrong, so each evaluation doubles the group,
    # and the next GRPO step samples the larger group.
    config = rlvr_config("train.max_steps=2", "rlvr.phase=grpo", "rlvr.monitor_problems=0", "train.eval_every=1")
    host = rlvr_host(config)
    result = _trainer(host, config, tmp_path / "adapt2", char_tokenizer).fit()
    assert [a["changes"] for a in result.metrics.adaptations] == [{"group_size": 8}, {"group_size": 16}]
    assert host.instance("rlvr").training.compute.sampled_completions == 4 * 4 + 4 * 8
    assert [e.data["changes"] for e in host.events if e.event == "adapted" and e.plugin == "rlvr"] == \
        [{"group_size": 8}, {"group_size": 16}]


def test_each_variant_has_its_own_plugin_state(tmp_path, rlvr_config, rlvr_host, char_tokenizer):
    config = rlvr_config("train.max_steps=2", "rlvr.monitor_problems=0", "rlvr.adapt=false")
    host = rlvr_host(config)
    host.settings["rlvr"] = host.settings["rlvr"].model_copy(update={"phase": "sft"})
    _trainer(host, config, tmp_path / "a", char_tokenizer, label="a").fit()
    host.settings["rlvr"] = host.settings["rlvr"].model_copy(update={"phase": "grpo"})
    _trainer(host, config, tmp_path / "b", char_tokenizer, label="b").fit()
    a, b = host.instances["a"]["rlvr"], host.instances["b"]["rlvr"]
    assert a is not b and a.training is not b.training
    assert (a.training.compute.sft_steps, a.training.compute.grpo_steps) == (2, 0)
    assert (b.training.compute.sft_steps, b.training.compute.grpo_steps) == (0, 2)
    assert (a.settings.phase, b.settings.phase) == ("sft", "grpo")
    assert json.loads(json.dumps(b.state_dict())) == b.state_dict()  # JSON values, as the checkpoint needs


def test_ryzen_run_with_rlvr_trains_evaluates_accuracy_vs_n_and_writes_figures(tiny_config, rlvr_host, tiny_run):
    config = tiny_config("train.threads=1", "model.context_length=64", *SMALL_EVAL, plugins=["rlvr"])
    host = rlvr_host(config)
    run_dir = tiny_run(host, config)
    report = json.loads((run_dir / "optimized" / "rlvr_report.json").read_text())
    assert [r["decoding"] for r in report["accuracy_vs_n"]] == ["greedy", "N=1", "N=2", "N=4", "N=4 adaptive"]
    assert report["problems"] == 12 and report["throughput"]["identical_paths"]
    assert (run_dir / "optimized" / "rlvr_accuracy_vs_n.png").stat().st_size > 0
    assert "| decoding |" in (run_dir / "optimized" / "rlvr_report.md").read_text()
    # on_train_end's ReportSection lands in report.md, its figure linked from the run directory.
    report_md = (run_dir / "report.md").read_text()
    assert "## rlvr (optimized)" in report_md and "](optimized/rlvr_accuracy_vs_n.png)" in report_md
    analysis = json.loads((run_dir / "optimization_analysis.json").read_text())
    events = {e["event"] for e in analysis["events"] if e["plugin"] == "rlvr"}
    assert {"phase", "accuracy_vs_n", "paths_per_s", "compute", "multipath"} <= events
    validation = json.loads((run_dir / "inference_validation_report.json").read_text())
    assert "torch-optimized" in validation["backends"]  # the multi-path generate was measured
    assert "rlvr" not in host.instances["baseline"]  # the baseline trains without it


def test_rlvr_train_and_eval_commands(tmp_path, ryzen_cli):
    only_rlvr = {"RYZEN_LOAD_PLUGINS": "rlvr"}
    out = tmp_path / "task-run"
    result = ryzen_cli("rlvr", "train", "--out", str(out), "--sft-steps", "4", "--grpo-steps", "2",
                       *tiny_sets(*TASK_MODEL, *SMALL_EVAL), env=only_rlvr)
    assert result.returncode == 0, result.stderr
    assert "Greedy accuracy after the supervised warm-up" in result.stdout
    for phase in ("sft", "grpo"):
        assert (out / phase / "metrics.csv").is_file() and (out / phase / "training_checkpoint" / "LATEST").is_file()
    report = json.loads((out / "rlvr_report.json").read_text())
    assert report["compute"]["sft"]["sft_steps"] == 4 and report["compute"]["grpo"]["grpo_steps"] == 2
    assert report["compute"]["grpo"]["sft_steps"] == 0  # each phase's plugin instance counts its own work
    assert "warmup_vs_final" in report
    analysis = json.loads((out / "optimization_analysis.json").read_text())
    assert set(analysis["settings_by_variant"]) == {"sft", "grpo"}
    assert analysis["settings_by_variant"]["grpo"]["rlvr"]["phase"] == "grpo"
    assert any(e["event"] == "accuracy_vs_n" for e in analysis["events"])

    result = ryzen_cli("rlvr", "eval", str(out), "--no-throughput", "--out", str(tmp_path / "ev"),
                       "--set", "rlvr.eval_paths=[1,2]", env=only_rlvr)
    assert result.returncode == 0, result.stderr
    assert f"Model: {out / 'grpo'}" in result.stdout
    again = json.loads((tmp_path / "ev" / "rlvr_report.json").read_text())
    greedy = [r for r in report["accuracy_vs_n"] if r["decoding"] == "greedy"][0]
    assert [r for r in again["accuracy_vs_n"] if r["decoding"] == "greedy"][0]["correct"] == greedy["correct"]
