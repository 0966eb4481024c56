"""The rlvr plugin (entry-point name `rlvr`): one `RlvrPlugin` per variant, its state on the instance.

- on_model_load: optionally load warm-up weights (`init_from`); set up the task training state.
- transform_forward: the training forward of the task (supervised warm-up, then GRPO); see training.py.
- on_train_start / on_train_batch_end: keep the optimizer (its step counter tells the forward which phase
  it is in) and run GRPO steps at `grpo_lr_scale` times the schedule's rate.
- on_epoch_end: greedy accuracy on validation problems; in GRPO, an Adaptation of group size and temperature.
- on_train_end: accuracy vs N on held-out problems, warm-up vs final, paths/s -> rlvr_report.* in the
  variant's directory and a section of report.md.
- on_infer: N sampled paths per prompt in one batch, answer chosen by majority vote or best-of-N.

Heavy imports happen inside the hooks: this module is imported whenever `ryzen` starts.
"""
from __future__ import annotations

from typing import Any

from ryzen_core import Adaptation, Plugin, ReportSection, hookimpl

from .settings import RlvrSettings
from .tasks import get_task


class RlvrPlugin(Plugin):
    """Verifiable tasks: training with the verifier as reward, and multi-path inference."""

    Settings = RlvrSettings

    def __init__(self, settings: RlvrSettings | None = None, context: Any = None):
        super().__init__(settings, context)
        self.training = None  # TaskTraining, once on_model_load built the model this variant trains

    def _training_on(self) -> bool:
        return self.training is not None and self.settings.phase != "off"

    @hookimpl
    def register_commands(self, cli):
        from .cli import rlvr

        cli.add_command(rlvr)

    @hookimpl
    def on_model_load(self, model, config, record):
        from .training import WARMUP_FILE, TaskTraining, load_initial_weights

        settings = self.settings
        if settings.init_from is not None:
            load_initial_weights(model, settings.init_from, record)
        # Settings are read through the instance at every use: the host replaces them on resume and adaptation.
        self.training = TaskTraining(model, self.context.tokenizer, get_task(settings.task, **settings.task_options),
                                     lambda: self.settings, config.train.max_steps,
                                     self.context.variant_dir / WARMUP_FILE, record)

    @hookimpl
    def transform_forward(self, forward, record):
        if not self._training_on():
            return None
        self.training.record = record  # what the forward records is filed under this hook
        self.training.sft_steps  # a phase that cannot run under this config fails now, not mid-training
        return self.training.wrap(forward)

    # The GRPO learning rate is set on the optimizer in these two hooks rather than adapted as a setting: it
    # is the optimizer's state, not ours, and an Adaptation (on_epoch_end) comes only every eval_every steps.
    # A run that is GRPO from its first step scales the peak in on_train_start, before the schedule exists,
    # so the schedule scales it. A run that switches from the warm-up scales each GRPO step's rate in
    # on_train_batch_end: it runs once per optimizer step, right after the scheduler wrote the next rate,
    # so the rate is scaled exactly once whatever the gradient accumulation. Either way the trainer logs
    # the rate as applied, and the checkpoint (saved after these hooks) keeps it for a resumed run.
    @hookimpl
    def on_train_start(self, optimizer):
        if self.training is None:
            return
        self.training.optimizer = optimizer
        if self._training_on() and self.training.sft_steps == 0:
            self._scale_lr(optimizer)

    @hookimpl
    def on_train_batch_end(self, optimizer):
        if self._training_on() and self.training.sft_steps > 0 and self.training.phase() == "grpo":
            self._scale_lr(optimizer)

    def _scale_lr(self, optimizer) -> None:
        """GRPO at grpo_lr_scale times the schedule: policy-gradient steps are noisier than supervised ones."""
        for group in optimizer.param_groups:
            group["lr"] *= self.settings.grpo_lr_scale

    @hookimpl
    def on_epoch_end(self, epoch, metrics, model, record):
        if not self._training_on():
            return None
        training, settings = self.training, self.settings
        if settings.monitor_problems:
            accuracy = training.greedy_accuracy(model, settings.monitor_problems, split="validation")
            record("validation_accuracy", epoch=epoch, step=metrics.get("step"), phase=training.phase(),
                   greedy_accuracy=accuracy, problems=settings.monitor_problems)
        if training.phase() != "grpo" and not training.stats.groups:
            return None
        changes, reason = training.adapt(epoch, metrics.get("step"), record)
        return Adaptation(changes, reason) if changes else None

    @hookimpl
    def on_train_end(self, model, record):
        from .evaluate import evaluate_model, report_markdown

        if self.training is None:
            return None
        training, out = self.training, self.context.variant_dir
        compute = training.compute.as_dict()
        warmup = training.reference if training.compute.grpo_steps else None
        report = evaluate_model(model, self.context.tokenizer, self.settings, out, warmup_model=warmup,
                                compute=compute, record=record)
        record("compute", **compute)
        return ReportSection(report_markdown(report), files={
            "report": out / "rlvr_report.md", "data": out / "rlvr_report.json",
            "figure": out / "rlvr_accuracy_vs_n.png"})

    @hookimpl
    def on_infer(self, generate, model, tokenizer, record):
        from .multipath import multipath_generate

        settings = self.settings
        if settings.paths <= 1 or settings.temperature == 0:
            return None  # one path, or N identical greedy ones: plain generation already is that
        record("multipath", paths=settings.paths, temperature=settings.temperature, top_p=settings.top_p,
               selection=settings.selection)
        return multipath_generate(generate, model, tokenizer, get_task(settings.task, **settings.task_options),
                                  settings.paths, settings.temperature, settings.top_p, settings.selection)

    def state_dict(self) -> dict[str, Any]:
        """The task forward's counters, group statistics and the GRPO batch being reused."""
        return self.training.state() if self.training is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A validation worker only generates: it has no training to restore, and needs none.
        if self.training is not None and state:
            self.training.load_state(state)
