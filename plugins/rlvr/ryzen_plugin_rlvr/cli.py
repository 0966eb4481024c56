"""`ryzen rlvr ...`: tasks, problems, train (warm-up + GRPO + evaluation) and eval.

Imported by the plugin's register_commands at every `ryzen` start: heavy imports wait inside the commands.
"""
from __future__ import annotations

import functools
from pathlib import Path

import click

from ryzen_core import ConfigError, out_option, with_run_config

from .settings import TASK_MODEL_DEFAULTS, rlvr_settings
from .tasks import available_tasks, get_task


@click.group("rlvr")
def rlvr():
    """Verifiable tasks: multi-path inference and training with the verifier as reward."""


@rlvr.command("tasks")
def tasks_command():
    """List the tasks: built-in and from installed packages (entry points); `module:Class` names any other."""
    for name in sorted(available_tasks()):
        try:
            task = get_task(name)
            click.echo(f"{name:<14} verifiable at inference: {'yes' if task.verifiable_at_inference else 'no'}")
        except Exception as exc:  # a broken third-party task is listed, not fatal
            click.echo(f"{name:<14} failed to load: {exc}")


@rlvr.command("problems")
@click.argument("task")
@click.option("--seed", default=1, show_default=True)
@click.option("--count", default=3, show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
def problems_command(task, seed, count, split):
    """Print problems of TASK with their reference solutions and the verifier's reward for them."""
    try:
        t = get_task(task)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="TASK") from None
    for p in t.problems(count, seed=seed, split=split):
        click.echo(f"{p.prompt}{p.solution}    reward {t.reward(p, p.solution):g}")


def on_task_model_defaults(command):
    """--set values apply on top of TASK_MODEL_DEFAULTS: a task model's config, not the core's defaults."""
    @functools.wraps(command)
    def with_defaults(**options):
        return command(**dict(options, overrides=(*TASK_MODEL_DEFAULTS, *options["overrides"])))

    return with_defaults


@rlvr.command("train")
@out_option
@click.option("--sft-steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--grpo-steps", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--grpo-lr", default=5e-5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate of the GRPO phase (the warm-up uses train.lr).")
@click.option("--resume", is_flag=True, help="Continue each phase from its last checkpoint in --out.")
@click.option("--no-throughput", is_flag=True, help="Skip the paths/s measurement.")
@on_task_model_defaults
@with_run_config("rlvr")
def train_command(host, config, out_dir, sft_steps, grpo_steps, grpo_lr, resume, no_throughput):
    """Train a task model from scratch: supervised warm-up, then GRPO, then accuracy vs N.

    The model, data and tokenizer are the task's own (character tokens, a small transformer; see
    TASK_MODEL_DEFAULTS); --set changes any of it, e.g. --set rlvr.task_options.digits=2.
    """
    from ryzen_core import run_directory, write_json

    from .evaluate import evaluate_model, report_markdown
    from .pipeline import optimization_analysis, train_task_model

    if resume and out_dir is None:
        raise click.UsageError("--resume needs --out (the run directory to continue)")
    if out_dir is not None:
        config.output.dir = out_dir
    run_dir = run_directory(config)
    trained = train_task_model(config, host, run_dir, sft_steps, grpo_steps, grpo_lr, resume=resume)
    phases = trained["phases"]
    report = evaluate_model(trained["grpo_model"], trained["tokenizer"], host.settings["rlvr"], run_dir,
                            warmup_model=trained["sft_model"], throughput=not no_throughput,
                            compute={label: {"wall_s": round(p["wall_s"], 1), "steps": p["summary"]["steps"],
                                             **(p["compute"] or {})} for label, p in phases.items()},
                            record=host.recorder("rlvr", "rlvr train"))
    write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, phases))
    click.echo(report_markdown(report))
    click.echo(f"Run directory: {run_dir}")


def scored_model_dir(run_dir: Path) -> Path:
    """What `rlvr eval` scores: the GRPO phase of `ryzen rlvr train`, the optimized variant of `ryzen run`,
    or the one model of a `ryzen train` run."""
    from ryzen_core import trained_model_dirs

    for variant in (run_dir / "grpo", run_dir / "optimized"):
        if trained_model_dirs(variant) == [variant]:
            return variant
    return run_dir


@rlvr.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a setting of the saved config, e.g. rlvr.eval_problems=500.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Where to write the report (default RUN_DIR).")
@click.option("--no-throughput", is_flag=True, help="Skip the paths/s measurement.")
def eval_command(run_dir, overrides, out_dir, no_throughput):
    """Accuracy vs N (and paths/s) of the model trained in RUN_DIR, on held-out problems."""
    from ryzen_core import load_config, load_trained_model

    from .evaluate import evaluate_model, report_markdown
    from .pipeline import CONFIG_FILE

    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE, overrides)
    if "rlvr" not in config.plugins:  # another run's model knows no task: scoring it takes minutes for nothing
        raise ConfigError(f"{run_dir} is not an rlvr run (its plugins: {', '.join(config.plugins) or 'none'}); "
                          "rlvr eval scores models from `ryzen rlvr train` or `ryzen run --plugins rlvr`")
    settings = rlvr_settings(config)
    if config.train.threads:
        import torch

        torch.set_num_threads(config.train.threads)
    model, tokenizer, loaded = load_trained_model(scored_model_dir(run_dir))
    report = evaluate_model(model, tokenizer, settings, out_dir or run_dir, throughput=not no_throughput)
    click.echo(f"Model: {loaded}")
    click.echo(report_markdown(report))
