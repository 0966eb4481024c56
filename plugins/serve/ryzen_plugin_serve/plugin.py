"""Hook implementations of the serve plugin (entry-point name `serve`): it only adds a command.

FastAPI, uvicorn and torch are imported inside the command, so `ryzen --help` stays fast.
"""
from __future__ import annotations

from ryzen_core import hookimpl


@hookimpl
def register_commands(cli):
    from .cli import serve_command

    cli.add_command(serve_command)
