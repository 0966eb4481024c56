"""The `ryzen` command line: argument parsing and exit codes only; the work lives in the modules."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import RyzenError
from .run import prepare


class RyzenGroup(click.Group):
    """Turns user errors into one line on stderr and their exit code instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RyzenError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a write or read the code did not map itself: still one line, with the path
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _split_plugins(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def _host(ctx: click.Context):
    return ctx.find_root().obj["host"]


config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML or JSON config file.")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config value; repeatable.")
plugins_option = click.option("--plugins", "plugins", metavar="A,B", help="Optimization plugins to apply, in this order.")
out_option = click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory (default runs/<timestamp>).")


def with_run_config(*plugins: str):
    """For a plugin's command: add --config and --set, validate the config with `plugins` selected (a bad
    value is one line and exit 2, before any work) and call the command as `fn(host, config, **options)`.

        @cli.command("tune")
        @with_run_config("kernel")
        @click.option("--rounds", type=int, default=5)
        def tune(host, config, rounds): ...
    """
    def decorate(fn):
        @functools.wraps(fn)
        def command(ctx, config_path, overrides, **options):
            host = _host(ctx)
            return fn(host, prepare(host, config_path, overrides, list(plugins) or None), **options)

        return config_option(set_option(click.pass_context(command)))

    return decorate


@click.group(cls=RyzenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ryzen")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool):
    """Train, optimize and benchmark small language models on CPUs.

    Every optimization is a plugin (entry-point group `ryzen.plugins`); see `ryzen plugins`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not verbose:  # libraries' info lines (exporters, loaders) drown ours; keep only their warnings
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("ryzen"))


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins_command(ctx, as_json):
    """List installed plugins: name, distribution, version, hooks and load status."""
    records = [r.as_dict() for r in _host(ctx).records.values()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("No plugins installed (or RYZEN_LOAD_PLUGINS is empty).")
    for r in records:
        where = f"{r['distribution']} {r['version']}" if r["distribution"] else r["module"]
        click.echo(f"{r['name']:<14} {r['status']:<8} {where}")
        click.echo(f"{'':<14} hooks: {', '.join(r['hooks']) or '-'}" if r["status"] == "loaded" else f"{'':<14} error: {r['error']}")


@cli.group("plugin")
def plugin_group():
    """Start a plugin of your own."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--dir", "parent", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Where to create ryzen-plugin-NAME/.")
def plugin_new_command(name, parent):
    """Write ryzen-plugin-NAME/: the entry point NAME, a Plugin class with commented hooks, a README, tests."""
    from .scaffold import new_plugin

    target = new_plugin(name, parent)
    click.echo(f"Wrote {target}. Next: pip install -e {target} && python -m pytest {target} "
               f"&& ryzen run --plugins {name}")


@cli.group("config")
def config_group():
    """Show the effective config or its schema."""


@config_group.command("show")
@config_option
@set_option
@plugins_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@click.pass_context
def config_show(ctx, config_path, overrides, plugins, as_json):
    """Print the effective config: defaults, then the file, then --set."""
    config = prepare(_host(ctx), config_path, overrides, _split_plugins(plugins))
    data = config.dump()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@config_group.command("schema")
@click.pass_context
def config_schema(ctx):
    """Print the JSON schema of the config, plugin sections included."""
    from .run import config_schema as schema

    click.echo(json.dumps(schema(_host(ctx)), indent=2))


@cli.command("run")
@plugins_option
@config_option
@set_option
@out_option
@click.option("--ablate", is_flag=True, help="Also measure each selected plugin alone.")
@click.pass_context
def run_command(ctx, plugins, config_path, overrides, out_dir, ablate):
    """Train a baseline and an optimized model, validate both, and write a paired report."""
    from .run import run_pipeline

    host = _host(ctx)
    config = prepare(host, config_path, overrides, _split_plugins(plugins), out_dir)
    run_dir = run_pipeline(config, host, ablate=ablate)
    click.echo(f"Run directory: {run_dir}")


@cli.command("train")
@plugins_option
@config_option
@set_option
@out_option
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes for data-parallel training on this machine (torchrun, gloo).")
@click.pass_context
def train_command(ctx, plugins, config_path, overrides, out_dir, resume_dir, nproc):
    """Train one model (with the selected plugins) and write its checkpoint and metrics."""
    from .run import train_one, launch_distributed

    host = _host(ctx)
    if resume_dir is not None:
        from .checkpoint import saved_run_config

        config_path = config_path or saved_run_config(resume_dir)
        out_dir = resume_dir
    config = prepare(host, config_path, overrides, _split_plugins(plugins), out_dir)
    if nproc > 1:
        sys.exit(launch_distributed(nproc, config, sys.argv[1:]))
    run_dir = train_one(config, host, resume=resume_dir is not None)
    click.echo(f"Run directory: {run_dir}")


@cli.group("bench")
def bench_group():
    """Benchmarks: paired, interleaved measurements in one process."""


@bench_group.command("train")
@plugins_option
@config_option
@set_option
@click.option("--rounds", type=click.IntRange(min=2), default=7, show_default=True,
              help="Timed rounds per side, at least.")
@click.option("--max-rounds", type=click.IntRange(min=2), default=15, show_default=True,
              help="Rounds are added up to this many while the speedup's 95% interval is wider than +-5%.")
@click.option("--steps", "steps_per_round", type=click.IntRange(min=1), default=5, show_default=True,
              help="Optimizer steps per round.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the result as JSON here.")
@click.pass_context
def bench_train_command(ctx, plugins, config_path, overrides, rounds, max_rounds, steps_per_round, json_out):
    """Training tokens/s and model FLOPs utilization; with --plugins, paired against the baseline."""
    from .bench import bench_train, train_bench_markdown
    from .report import write_json

    host = _host(ctx)
    config = prepare(host, config_path, overrides, _split_plugins(plugins))
    result = bench_train(config, host, config.plugins, rounds, steps_per_round, max_rounds=max_rounds)
    if json_out:
        write_json(json_out, result)
    click.echo(train_bench_markdown(result, config))


@bench_group.command("infer")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@set_option
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the report as JSON here.")
@click.pass_context
def bench_infer_command(ctx, run_dir, overrides, json_out):
    """Validate the models and exports of an earlier run again: latency, throughput, memory, perplexity."""
    from .checkpoint import saved_run_config
    from .report import write_json
    from .run import bench_inference
    from .runtime_table import runtime_markdown
    from .validator import validation_markdown

    host = _host(ctx)
    config = prepare(host, saved_run_config(run_dir), overrides, None)
    report = bench_inference(run_dir, host, config)
    if json_out:
        write_json(json_out, report)
    click.echo(validation_markdown(report))
    click.echo(runtime_markdown(report["runtime_table"]))


def build_cli(host) -> click.Group:
    """Let every loaded plugin add its commands; a plugin that raises here is disabled, not fatal."""
    host.call_each("register_commands", host.loaded_names(), cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    from .plugins import load_plugins

    host = load_plugins()
    build_cli(host).main(args=argv, prog_name="ryzen", obj={"host": host})


if __name__ == "__main__":  # torchrun starts workers with `python -m ryzen_core.cli`
    main()
