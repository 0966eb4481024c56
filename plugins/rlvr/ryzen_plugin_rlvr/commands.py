"""`ryzen rlvr ...` commands: tasks, problems, train (warm-up + GRPO + evaluation) and eval."""
from __future__ import annotations

from pathlib import Path

import click


def _host(ctx: click.Context):
    return ctx.find_root().obj["host"]


def add_commands(cli: click.Group) -> None:
    @cli.group("rlvr")
    def rlvr_group():
        """Verifiable tasks: multi-path inference and training with the verifier as reward."""

    @rlvr_group.command("tasks")
    def tasks_command():
        """List the tasks: built-in, from installed packages (entry points) and registered."""
        from .tasks import available_tasks, get_task

        for name in sorted(available_tasks()):
            try:
                task = get_task(name)
                click.echo(f"{name:<14} verifiable at inference: {'yes' if task.verifiable_at_inference else 'no'}")
            except Exception as exc:  # a broken third-party task is listed, not fatal
                click.echo(f"{name:<14} failed to load: {exc}")

    @rlvr_group.command("problems")
    @click.argument("task")
    @click.option("--seed", default=1, show_default=True)
    @click.option("--count", default=3, show_default=True)
    @click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
    def problems_command(task, seed, count, split):
        """Print problems of TASK with their reference solutions and the verifier's reward for them."""
        from .tasks import get_task

        try:
            t = get_task(task)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="TASK") from None
        for p in t.problems(count, seed=seed, split=split):
            click.echo(f"{p.prompt}{p.solution}    reward {t.reward(p, p.solution):g}")

    @rlvr_group.command("train")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML or JSON config file.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one config value (after the task-model defaults); repeatable.")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory (default runs/<timestamp>).")
    @click.option("--sft-steps", default=1000, show_default=True, type=click.IntRange(min=1))
    @click.option("--grpo-steps", default=150, show_default=True, type=click.IntRange(min=1))
    @click.option("--grpo-lr", default=5e-5, show_default=True, type=click.FloatRange(min=0, min_open=True),
                  help="Learning rate of the GRPO phase (the warm-up uses train.lr).")
    @click.option("--resume", is_flag=True, help="Continue each phase from its last checkpoint in --out.")
    @click.option("--no-throughput", is_flag=True, help="Skip the paths/s measurement.")
    @click.pass_context
    def train_command(ctx, config_path, overrides, out_dir, sft_steps, grpo_steps, grpo_lr, resume, no_throughput):
        """Train a task model from scratch: supervised warm-up, then GRPO, then accuracy vs N.

        The model, data and tokenizer are the task's own (character tokens, a small transformer; see
        TASK_MODEL_DEFAULTS); --set changes any of it, e.g. --set rlvr.task_options.digits=2.
        """
        from ryzen_core.run import prepare, run_directory

        from .pipeline import TASK_MODEL_DEFAULTS, evaluate_model, train_task_model

        host = _host(ctx)
        if resume and out_dir is None:
            raise click.UsageError("--resume needs --out (the run directory to continue)")
        config = prepare(host, config_path, [*TASK_MODEL_DEFAULTS, *overrides], ["rlvr"], out_dir)
        run_dir = run_directory(config)
        trained = train_task_model(config, host, run_dir, sft_steps, grpo_steps, grpo_lr, resume=resume)
        report = evaluate_model(trained["grpo_model"], trained["tokenizer"], host.settings["rlvr"], run_dir,
                                warmup_model=trained["sft_model"], throughput=not no_throughput,
                                compute={label: {"wall_s": round(p["wall_s"], 1), "steps": p["summary"]["steps"],
                                                 **(p["compute"] or {})} for label, p in trained["phases"].items()},
                                record=host.recorder("rlvr", "rlvr train"))
        from ryzen_core.report import write_json
        from ryzen_core.run import optimization_analysis

        from .evaluate import report_markdown

        summaries = {label: p["summary"] for label, p in trained["phases"].items()}
        write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, summaries))
        click.echo(report_markdown(report))
        click.echo(f"Run directory: {run_dir}")

    @rlvr_group.command("eval")
    @click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override a setting of the saved config, e.g. rlvr.eval_problems=500.")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Where to write the report (default RUN_DIR).")
    @click.option("--no-throughput", is_flag=True, help="Skip the paths/s measurement.")
    @click.pass_context
    def eval_command(ctx, run_dir, overrides, out_dir, no_throughput):
        """Accuracy vs N (and paths/s) of the model trained in RUN_DIR, on held-out problems."""
        from ryzen_core.checkpoint import saved_run_config
        from ryzen_core.run import prepare

        from .evaluate import report_markdown
        from .pipeline import evaluate_model, load_trained_model

        host = _host(ctx)
        config = prepare(host, saved_run_config(run_dir), overrides, None)
        if "rlvr" not in config.plugins:  # another run's model knows no task: scoring it takes minutes for nothing
            from ryzen_core.errors import ConfigError

            raise ConfigError(f"{run_dir} is not an rlvr run (its plugins: {', '.join(config.plugins) or 'none'}); "
                              "rlvr eval scores models from `ryzen rlvr train` or `ryzen run --plugins rlvr`")
        if config.train.threads:
            import torch

            torch.set_num_threads(config.train.threads)
        model, tokenizer, checkpoint = load_trained_model(run_dir, config)
        report = evaluate_model(model, tokenizer, host.settings["rlvr"], out_dir or run_dir,
                                throughput=not no_throughput)
        click.echo(f"Model: {checkpoint}")
        click.echo(report_markdown(report))
