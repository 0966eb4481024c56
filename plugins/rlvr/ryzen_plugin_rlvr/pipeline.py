"""`ryzen rlvr train` and `ryzen rlvr eval`: a task model from scratch, and its evaluation report.

train: task data -> supervised warm-up (core Trainer, run_dir/sft) -> GRPO from the warm-up weights
(core Trainer, run_dir/grpo) -> accuracy vs N, warm-up vs GRPO, paths/s -> rlvr_report.{json,md,png}.
Both phases are ordinary trainer runs: metrics.csv, checkpoints, and --resume per phase.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .sampling import TaskCodec
from .tasks import Task, get_task

log = logging.getLogger(__name__)


# A model sized for the task: one character per token, prompts of about ten characters.
TASK_MODEL_DEFAULTS = [
    "model.preset=tiny", "model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.d_ff=512",
    "model.context_length=48", "data.seq_len=48",
    "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=20", "train.eval_every=100",
    "train.eval_batches=4", "train.checkpoint_every=100", "train.weight_decay=0.0",
    "validate.prompt_len=8", "validate.new_tokens=8",
]
CHARACTER_VOCAB = 257  # the 256 byte symbols and end-of-text: byte-level BPE with no merges


def character_tokenizer(cache_dir: Path):
    """Byte-level BPE with no merges: every character of task text is its own token."""
    from ryzen_core.data import train_tokenizer

    return train_tokenizer(["0123456789 +-*/()=:>"], CHARACTER_VOCAB, cache_dir)


def task_data(task: Task, tokenizer: Any, seq_len: int, seed: int, train_problems: int = 4096,
              held_out_problems: int = 512):
    """PreparedData of task text for the core Trainer, which needs batches to read and a validation
    split to score. The task forward draws its own problems and trains on answers only, so the core's
    validation loss (every token, prompts included) is not a measure of progress here; the recorded
    validation_accuracy is."""
    from ryzen_core.data import PreparedData, pack, unigram_perplexity

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
    are restored afterwards. Returns the model, its summary, wall time and the task forward's compute."""
    from ryzen_core.trainer import Trainer

    from .plugin import training_state

    settings = host.settings["rlvr"]
    host.settings["rlvr"] = settings.model_copy(update=setting_updates)
    try:
        started = time.perf_counter()
        result = Trainer(config, host, ["rlvr"], out_dir, data, label=label).fit(resume=resume)
        wall = time.perf_counter() - started
    finally:
        host.settings["rlvr"] = settings
    result.metrics.write_csv(out_dir / "metrics.csv")
    state = training_state(result.model)
    return {"model": result.model, "summary": result.summary(), "wall_s": wall, "adaptations": result.metrics.adaptations,
            "compute": state.compute.as_dict() if state else None}


def prepare_task_run(config, host, run_dir: Path) -> tuple[Task, Any, Any]:
    """The task, its character tokenizer (saved into run_dir) and the trainer's data."""
    from ryzen_core.checkpoint import CONFIG_FILE, atomic_write_text

    settings = host.settings["rlvr"]
    task = get_task(settings.task, **settings.task_options)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.dump(), indent=2, default=str))
    tokenizer = character_tokenizer(config.data.cache_dir)
    tokenizer.save(run_dir / "tokenizer")
    return task, tokenizer, task_data(task, tokenizer, config.data.seq_len, settings.eval_seed)


def train_task_model(config, host, run_dir: Path, sft_steps: int, grpo_steps: int, grpo_lr: float,
                     resume: bool = False) -> dict[str, Any]:
    """Warm-up (run_dir/sft) then GRPO from its weights (run_dir/grpo), each through the core Trainer."""
    from ryzen_core.checkpoint import latest_checkpoint

    task, tokenizer, data = prepare_task_run(config, host, run_dir)
    sft = train_phase(phase_config(config, max_steps=sft_steps), host, run_dir / "sft", data, "sft", resume,
                      phase="sft")
    grpo = train_phase(phase_config(config, max_steps=grpo_steps, lr=grpo_lr, warmup_steps=min(10, grpo_steps)),
                       host, run_dir / "grpo", data, "grpo", resume, phase="grpo",
                       init_from=latest_checkpoint(run_dir / "sft"), grpo_lr_scale=1.0)
    return {"sft_model": sft["model"], "grpo_model": grpo["model"], "tokenizer": tokenizer, "task": task,
            "phases": {"sft": sft, "grpo": grpo}}


def evaluate_model(model: torch.nn.Module, tokenizer: Any, settings: Any, out_dir: Path, *,
                   warmup_model: torch.nn.Module | None = None, compute: dict | None = None,
                   record: Callable[..., None] | None = None, throughput: bool = True) -> dict[str, Any]:
    """Accuracy vs N on held-out problems (and the warm-up model's greedy accuracy, and paths/s);
    writes rlvr_report.json, rlvr_report.md and rlvr_accuracy_vs_n.png into out_dir."""
    from ryzen_core.report import write_json

    from .evaluate import accuracy_vs_n, greedy_accuracy, paths_throughput, plot_accuracy_vs_n, report_markdown

    record = record or (lambda event, **data: None)
    task = get_task(settings.task, **settings.task_options)
    codec = TaskCodec(tokenizer)
    problems = task.problems(settings.eval_problems, seed=settings.eval_seed, split="test")
    rows = accuracy_vs_n(model, codec, task, problems, settings.eval_paths, settings.temperature, settings.top_p,
                         settings.selection, seed=settings.eval_seed,
                         adaptive_n=settings.paths if settings.adaptive else None, round_size=settings.round_size,
                         max_new_tokens=settings.max_new_tokens)
    report: dict[str, Any] = {"task": task.name, "task_options": settings.task_options, "split": "test",
                              "problems": len(problems), "eval_seed": settings.eval_seed,
                              "verifiable_at_inference": task.verifiable_at_inference,
                              "temperature": settings.temperature, "top_p": settings.top_p,
                              "accuracy_vs_n": rows}
    if warmup_model is not None:
        before, after = greedy_accuracy(warmup_model, codec, task, problems), next(r for r in rows if r["decoding"] == "greedy")
        report["warmup_vs_final"] = {"warmup": before, "final": {k: after[k] for k in ("correct", "accuracy", "ci95")},
                                     "delta_points": 100 * (after["accuracy"] - before["accuracy"])}
    if throughput:
        log.info("rlvr eval: paths/s, batched vs one at a time (%d interleaved rounds)", settings.throughput_repeats)
        report["throughput"] = paths_throughput(model, codec, task, problems[: settings.throughput_prompts],
                                                n=settings.paths, temperature=settings.temperature,
                                                top_p=settings.top_p, repeats=settings.throughput_repeats,
                                                seed=settings.eval_seed)
    if compute:
        report["compute"] = compute
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "rlvr_report.json", report)
    (out_dir / "rlvr_report.md").write_text(report_markdown(report))
    plot_accuracy_vs_n(rows, out_dir / "rlvr_accuracy_vs_n.png", f"{task.name}: held-out accuracy vs N")
    greedy = next(r for r in rows if r["decoding"] == "greedy")
    record("accuracy_vs_n", task=task.name, problems=len(problems),
           accuracy={r["decoding"]: r["accuracy"] for r in rows},
           tokens_per_prompt={r["decoding"]: r["tokens_per_prompt"] for r in rows},
           wall_s={r["decoding"]: r["wall_s"] for r in rows}, greedy=greedy["accuracy"])
    if "throughput" in report:
        t = report["throughput"]
        record("paths_per_s", paths=t["paths"], batched=t["batched_paths_per_s"], one_by_one=t["one_by_one_paths_per_s"],
               median_ratio=t["median_ratio"], ci_low=t["ci_low"], ci_high=t["ci_high"], verdict=t["verdict"],
               identical=t["identical_paths"])
    if "warmup_vs_final" in report:
        record("warmup_vs_final", **{k: v for k, v in report["warmup_vs_final"].items() if k == "delta_points"},
               warmup=report["warmup_vs_final"]["warmup"]["accuracy"],
               final=report["warmup_vs_final"]["final"]["accuracy"])
    return report


def find_trained_model(run_dir: Path) -> tuple[Path, Path]:
    """(checkpoint directory, tokenizer directory) of the model a run directory holds: the GRPO phase of
    `ryzen rlvr train`, the optimized variant of `ryzen run`, or a `ryzen train` run."""
    from ryzen_core.checkpoint import latest_checkpoint
    from ryzen_core.errors import CheckpointError

    for candidate in (run_dir / "grpo", run_dir / "optimized", run_dir):
        checkpoint = latest_checkpoint(candidate) if candidate.is_dir() else None
        if checkpoint is None:
            continue
        for tokenizer_dir in (candidate / "tokenizer", run_dir / "tokenizer"):
            if (tokenizer_dir / "tokenizer.json").is_file():
                return checkpoint, tokenizer_dir
        raise CheckpointError(f"{candidate} has a checkpoint but no tokenizer/ next to it")
    raise CheckpointError(f"{run_dir} holds no trained model (no training_checkpoint/LATEST in it, grpo/ or optimized/)")


def load_trained_model(run_dir: Path, config) -> tuple[torch.nn.Module, Any, Path]:
    from ryzen_core.checkpoint import load_weights
    from ryzen_core.data import Tokenizer
    from ryzen_core.models.build import build_model

    checkpoint, tokenizer_dir = find_trained_model(run_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = build_model(config.model, tokenizer.vocab_size)
    load_weights(model, checkpoint)
    return model.eval(), tokenizer, checkpoint
