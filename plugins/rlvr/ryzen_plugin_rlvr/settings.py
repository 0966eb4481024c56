"""The rlvr plugin's settings (the `rlvr:` section of a config) and the config of a task model, shared by its
hooks, its commands and its benchmark."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ryzen_core import ConfigError, PluginSettings

from .tasks import available_tasks, get_task, is_task_path


# A model sized for the task: one character per token, prompts of about ten characters.
TASK_MODEL_DEFAULTS = [
    "model.preset=tiny", "model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.d_ff=512",
    "model.context_length=48", "data.seq_len=48",
    "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=20", "train.eval_every=100",
    "train.eval_batches=4", "train.checkpoint_every=100", "train.weight_decay=0.0",
    "validate.prompt_len=8", "validate.new_tokens=8",
]


class RlvrSettings(PluginSettings):
    """The `rlvr:` section of a run config (README, Settings)."""

    task: str = "arithmetic"
    """A built-in task (arithmetic, countdown), one of an installed package (entry-point group ryzen_rlvr.tasks),
    or `module:Class` for a Task subclass in any importable module."""
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
        if value not in available_tasks() and not is_task_path(value):
            raise ValueError(f"unknown task {value!r} (available: {', '.join(sorted(available_tasks()))}; or module:Class)")
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


def rlvr_settings(config: Any) -> RlvrSettings:
    """The validated `rlvr` section of a RunConfig, for code that runs outside a plugin host's run (the
    `ryzen rlvr eval` command, the benchmark). A bad value is a ConfigError naming the key."""
    try:
        return RlvrSettings.model_validate(config.plugin_sections.get("rlvr") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config error: rlvr{'.' + where if where else ''}: "
                          f"{first['msg'].removeprefix('Value error, ')}") from None
