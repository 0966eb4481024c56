"""Hook implementations of the rlvr plugin (entry-point name `rlvr`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ryzen_core import hookimpl

from .tasks import TASKS


class RlvrSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["arithmetic", "countdown"] = "arithmetic"
    paths: int = Field(8, gt=0, le=64)
    """Sampled paths per prompt for multi-path inference."""
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    selection: Literal["majority", "best_of_n"] = "majority"


@hookimpl
def ryzen_settings():
    return RlvrSettings


@hookimpl
def register_commands(cli):
    import click

    @cli.group("rlvr")
    def rlvr_group():
        """Verifiable tasks and their checkers."""

    @rlvr_group.command("problems")
    @click.argument("task", type=click.Choice(sorted(TASKS)))
    @click.option("--seed", default=0, show_default=True)
    @click.option("--count", default=3, show_default=True)
    def problems(task, seed, count):
        """Print held-out problems of TASK with their verified answers."""
        t = TASKS[task]()
        for p in t.problems(count, seed=seed, split="test"):
            click.echo(f"{p.prompt} {p.target}")
