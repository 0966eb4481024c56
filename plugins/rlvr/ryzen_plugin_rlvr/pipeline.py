"""`ryzen rlvr train`: a task model from scratch, as two core training runs.

Task data -> supervised warm-up (core Trainer, run_dir/sft) -> GRPO from the warm-up weights (core
Trainer, run_dir/grpo); the command then evaluates it (evaluate.py). Both phases are ordinary trainer
runs: metrics.csv, checkpoints, and --resume per phase. The model, tokenizer and data are the task's
own (character tokens, a small transformer), not those of `data.source`; inside `ryzen run` the plugin
uses the run's instead (its RunContext).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ryzen_core import PreparedData, Trainer, latest_checkpoint, pack, train_tokenizer, unigram_perplexity, write_json

from .sampling import TaskCodec
from .tasks import Task, get_task

CHARACTER_VOCAB = 257  # the 256 byte symbols and end-of-text: byte-level BPE with no merges
CONFIG_FILE = "config.json"  # where a run directory keeps its config (docs/architecture.md, "Files a run writes")


def character_tokenizer(cache_dir: Path):
    """Byte-level BPE with no merges: every character of task text is its own token."""
    return train_tokenizer(["0123456789 +-*/()=:>"], CHARACTER_VOCAB, cache_dir)


def task_data(task: Task, tokenizer: Any, seq_len: int, seed: int, train_problems: int = 4096,
              held_out_problems: int = 512) -> PreparedData:
    """PreparedData of task text for the core Trainer, which needs batches to read and a validation
    split to score. The task forward draws its own problems and trains on answers only, so the core's
    validation loss (every token, prompts included) is not a measure of progress here; the recorded
    validation_accuracy is."""
    codec = TaskCodec(tokenizer)

    def stream(split: str, n: int) -> np.ndarray:
        ids: list[int] = []
        for p in task.problems(n, seed=seed, split=split):
            ids += codec.prompt_ids(p.prompt) + codec.encode(p.solution)
        return np.asarray(ids + [codec.eos_id], dtype=np.int32)

    streams = {"train": stream("train", train_problems), "validation": stream("validation", held_out_problems),
               "test": stream("test", held_out_problems)}
    packed = {k: pack(v, seq_len) for k, v in streams.items()}
    sizes = {k: {"documents": n, "tokens": int(streams[k].size), "rows": int(packed[k].shape[0])}
             for k, n in (("train", train_problems), ("validation", held_out_problems), ("test", held_out_problems))}
    baseline = unigram_perplexity(streams["train"], packed["validation"][:, 1:].numpy().ravel(), tokenizer.vocab_size)
    return PreparedData(tokenizer, packed["train"], packed["validation"], packed["test"], sizes, baseline)


def phase_config(config, **train):
    """A copy of the run config with some train.* values replaced (each phase has its own budget and rate)."""
    phase = config.model_copy(deep=True)
    for key, value in train.items():
        setattr(phase.train, key, value)
    return phase


def train_phase(config, host, out_dir: Path, data, label: str, resume: bool = False, **setting_updates) -> dict:
    """One core Trainer run with the rlvr forward and these rlvr settings changed; the host's settings
    are restored afterwards. Returns the model, its summary, the settings it ended with (after
    adaptation), wall time and the task forward's compute."""
    settings = host.settings["rlvr"]
    host.settings["rlvr"] = settings.model_copy(update=setting_updates)  # the variant's instance starts from these
    try:
        started = time.perf_counter()
        result = Trainer(config, host, ["rlvr"], out_dir, data, label=label).fit(resume=resume)
        wall = time.perf_counter() - started
        final_settings = host.settings["rlvr"].model_dump(mode="json")
    finally:
        host.settings["rlvr"] = settings
    result.metrics.write_csv(out_dir / "metrics.csv")
    training = host.instance("rlvr").training  # this phase's plugin instance (the host runs hooks on it)
    return {"model": result.model, "summary": result.summary(), "settings": final_settings, "wall_s": wall,
            "adaptations": result.metrics.adaptations, "compute": training.compute.as_dict() if training else None}


def prepare_task_run(config, host, run_dir: Path) -> tuple[Task, Any, Any]:
    """The task, its character tokenizer (saved into run_dir) and the trainer's data; the config is saved
    into run_dir too, so the trained model can be loaded from it (`load_trained_model`)."""
    settings = host.settings["rlvr"]
    task = get_task(settings.task, **settings.task_options)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, config.dump())
    tokenizer = character_tokenizer(config.data.cache_dir)
    tokenizer.save(run_dir / "tokenizer")
    return task, tokenizer, task_data(task, tokenizer, config.data.seq_len, settings.eval_seed)


def train_task_model(config, host, run_dir: Path, sft_steps: int, grpo_steps: int, grpo_lr: float,
                     resume: bool = False) -> dict[str, Any]:
    """Warm-up (run_dir/sft) then GRPO from its weights (run_dir/grpo), each through the core Trainer."""
    task, tokenizer, data = prepare_task_run(config, host, run_dir)
    sft = train_phase(phase_config(config, max_steps=sft_steps), host, run_dir / "sft", data, "sft", resume,
                      phase="sft")
    grpo = train_phase(phase_config(config, max_steps=grpo_steps, lr=grpo_lr, warmup_steps=min(10, grpo_steps)),
                       host, run_dir / "grpo", data, "grpo", resume, phase="grpo",
                       init_from=latest_checkpoint(run_dir / "sft"), grpo_lr_scale=1.0)
    return {"sft_model": sft["model"], "grpo_model": grpo["model"], "tokenizer": tokenizer, "task": task,
            "phases": {"sft": sft, "grpo": grpo}}


def optimization_analysis(host, config, phases: dict[str, dict]) -> dict[str, Any]:
    """optimization_analysis.json of `ryzen rlvr train`, in the shape `ryzen run` writes: the settings each
    phase ended with, every recorded event, disabled plugins and adaptations per phase."""
    return {
        "plugins": config.plugins,
        "settings": {"rlvr": phases["grpo"]["settings"]},
        "settings_by_variant": {label: {"rlvr": p["settings"]} for label, p in phases.items()},
        "disabled": host.disabled,
        "events": [dict(e.__dict__) for e in host.events],
        "adaptations": {label: p["adaptations"] for label, p in phases.items() if p["adaptations"]},
    }
