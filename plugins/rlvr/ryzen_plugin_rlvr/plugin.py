"""Hook implementations of the rlvr plugin (entry-point name `rlvr`).

- on_model_load: optionally load warm-up weights (`init_from`); set up the task training state.
- transform_forward: the training forward of the task (supervised warm-up, then GRPO); see training.py.
- on_train_start: keeps the optimizer, whose step counter tells the forward which phase it is in.
- on_epoch_end: greedy accuracy on validation problems; in GRPO, adapts group size and temperature.
- on_train_end: accuracy vs N on held-out problems, warm-up vs final, paths/s -> rlvr_report.* in the run dir.
- on_infer: N sampled paths per prompt in one batch, answer chosen by majority vote or best-of-N.

Heavy imports happen inside the hooks: this module is imported whenever `ryzen` starts.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ryzen_core import hookimpl

from .tasks import available_tasks, get_task

_TRAINING: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class RlvrSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = "arithmetic"
    """A built-in task (arithmetic, countdown) or one registered under the entry-point group ryzen_rlvr.tasks."""
    task_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the task, e.g. {digits: 2} for arithmetic."""

    # -- inference (on_infer, evaluation) --
    paths: int = Field(8, gt=0, le=64)
    """Sampled paths per prompt."""
    temperature: float = Field(0.4, ge=0.0)
    """Chosen on validation problems (bench_rlvr.py): lower keeps each path accurate, the order of the
    chain still varies; 0 is greedy (one path)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, gt=0)
    """Tokens per path in evaluation and GRPO sampling; None: the task's own limit. (on_infer generates
    what its caller asks for.)"""
    selection: Literal["majority", "best_of_n"] = "majority"
    """majority: self-consistency vote over parsed answers; best_of_n: the task's verifier picks (tasks
    verifiable at inference only), falling back to the vote when no path verifies."""
    adaptive: bool = True
    """Evaluation: also run N=`paths` in rounds, stopping once the answer is decided."""
    round_size: int = Field(4, gt=0)

    # -- training (transform_forward) --
    phase: Literal["sft+grpo", "sft", "grpo", "off"] = "sft+grpo"
    """What the task forward trains; 'off' leaves training to the core (inference and evaluation only)."""
    sft_fraction: float = Field(0.6, ge=0.0, le=1.0)
    """Phase sft+grpo: the first sft_fraction of train.max_steps are supervised warm-up, the rest GRPO."""
    grpo_lr_scale: float = Field(0.1, gt=0.0, le=1.0)
    """GRPO steps run at this fraction of train.lr's schedule (`ryzen rlvr train` sets its own GRPO rate)."""
    sft_batch: int = Field(64, gt=0)
    """Problems per supervised step."""
    group_prompts: int = Field(16, gt=0)
    """GRPO: prompts per step."""
    group_size: int = Field(8, ge=2, le=64)
    """GRPO: completions sampled per prompt (the group)."""
    group_temperature: float = Field(1.0, gt=0.0)
    clip: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to the warm-up model (0: no reference forward)."""
    updates_per_batch: int = Field(1, gt=0)
    """GRPO updates per sampled batch; above 1 the clipped ratio matters."""
    lm_weight: float = Field(0.0, ge=0.0)
    """Weight of the core next-token loss on the trainer's batch (data.source), added to the task loss."""
    adapt: bool = True
    """on_epoch_end adapts group_size and group_temperature from how informative the groups were."""
    min_group_size: int = Field(4, ge=2)
    max_group_size: int = Field(32, ge=2)
    max_group_temperature: float = Field(1.5, gt=0.0)
    init_from: Path | None = None
    """Weights to start from: a checkpoint directory, a .safetensors file or a run directory."""

    # -- evaluation --
    eval_problems: int = Field(200, gt=0)
    eval_seed: int = 1
    eval_paths: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    monitor_problems: int = Field(100, ge=0)
    """Validation problems for the greedy accuracy recorded at each evaluation (0: off)."""
    throughput_prompts: int = Field(8, gt=0)
    throughput_repeats: int = Field(5, gt=0)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in available_tasks():
            raise ValueError(f"unknown task {value!r} (available: {', '.join(sorted(available_tasks()))})")
        return value

    @field_validator("eval_paths")
    @classmethod
    def _positive_paths(cls, value: list[int]) -> list[int]:
        if any(n < 1 or n > 64 for n in value):
            raise ValueError("eval_paths must be in 1..64")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        task = get_task(self.task, **self.task_options)  # bad task options fail here, before any work
        if self.selection == "best_of_n" and not task.verifiable_at_inference:
            raise ValueError(f"selection best_of_n needs a task verifiable at inference; {self.task} is not")
        if self.min_group_size > self.max_group_size:
            raise ValueError("min_group_size must not exceed max_group_size")
        return self


def training_state(model: Any):
    """The TaskTraining of a model trained with this plugin (None if it was not)."""
    return _TRAINING.get(model)


@hookimpl
def ryzen_settings():
    return RlvrSettings


@hookimpl
def on_model_load(model, tokenizer, config, settings, record):
    from .training import TaskTraining, load_initial_weights

    settings = settings or RlvrSettings()
    if settings.init_from is not None:
        load_initial_weights(model, settings.init_from, record)
    _TRAINING[model] = TaskTraining(model, tokenizer, get_task(settings.task, **settings.task_options), settings,
                                    config, record)


@hookimpl
def transform_forward(forward, model, config, settings, record):
    state = _TRAINING.get(model)
    if state is None or settings is None or settings.phase == "off":
        return None
    state.settings = settings  # after a resume the host holds a restored settings object
    state.record = record  # what the forward records is filed under this hook
    state.sft_steps  # a phase that cannot run under this config fails now, not mid-training
    return state.wrap(forward)


@hookimpl
def on_train_start(model, optimizer):
    state = _TRAINING.get(model)
    if state is not None:
        state.optimizer = optimizer


@hookimpl
def on_epoch_end(epoch, metrics, model, settings, record):
    state = _TRAINING.get(model)
    if state is None or settings is None or settings.phase == "off":
        return None
    state.settings = settings
    if settings.monitor_problems:
        accuracy = state.greedy_accuracy(model, settings.monitor_problems, split="validation")
        record("validation_accuracy", epoch=epoch, step=metrics.get("step"), phase=state.phase(),
               greedy_accuracy=accuracy, problems=settings.monitor_problems)
    if state.phase() != "grpo" and not state.stats.groups:
        return None
    return state.adapt(epoch, metrics.get("step")) or None


@hookimpl
def on_train_end(model, metrics, run_dir, config, settings, record):
    from .pipeline import evaluate_model

    state = _TRAINING.get(model)
    if state is None or settings is None:
        return None
    compute = state.compute.as_dict()
    warmup = state.reference if state.compute.grpo_steps else None
    report = evaluate_model(model, state.codec.tokenizer, settings, Path(run_dir), warmup_model=warmup,
                            compute=compute, record=record)
    record("compute", **compute)
    from .evaluate import report_markdown

    # report_markdown is for the core's report.md once it shows plugin sections (see README).
    return {"rlvr_report": str(Path(run_dir) / "rlvr_report.md"), "report_markdown": report_markdown(report),
            "accuracy": {r["decoding"]: r["accuracy"] for r in report["accuracy_vs_n"]}}


@hookimpl
def on_infer(generate, model, tokenizer, config, settings, record):
    from .multipath import multipath_generate

    settings = settings or RlvrSettings()
    if settings.paths <= 1 or settings.temperature == 0:
        return None  # one path, or N identical greedy ones: plain generation already is that
    record("multipath", paths=settings.paths, temperature=settings.temperature, top_p=settings.top_p,
           selection=settings.selection)
    return multipath_generate(generate, model, tokenizer, get_task(settings.task, **settings.task_options),
                              settings.paths, settings.temperature, settings.top_p, settings.selection)


@hookimpl
def register_commands(cli):
    from .commands import add_commands

    add_commands(cli)
