"""Hook implementations of the serve plugin (entry-point name `serve`): it only adds commands,
`ryzen serve` and `ryzen bench serve` (into the core's `bench` group).

FastAPI, uvicorn, httpx2 and torch are imported inside the commands, so `ryzen --help` stays fast.
"""
from __future__ import annotations

import click

from ryzen_core import hookimpl


@hookimpl
def register_commands(cli):
    from .bench_cli import bench_serve_command
    from .cli import serve_command

    cli.add_command(serve_command)
    bench = cli.commands.get("bench") if isinstance(cli, click.Group) else None
    if isinstance(bench, click.Group):
        bench.add_command(bench_serve_command)
    else:  # a host without the core's bench group (an embedding CLI): the command stands alone
        cli.add_command(bench_serve_command, "serve-bench")
