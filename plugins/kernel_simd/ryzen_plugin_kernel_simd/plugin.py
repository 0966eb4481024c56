"""Hook implementations of the kernel plugin (entry-point name `kernel`)."""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ryzen_core import hookimpl

from .cpu import detect


class KernelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto' trains under bf16 autocast only where the CPU has native bf16 (AVX-512 BF16 or AMX)."""
    threads: int | None = Field(None, gt=0)
    """Intra-op threads; default: the cores this process may use."""
    mask_features: list[str] = Field(default_factory=list)
    """Features to treat as absent (to exercise the fallback paths)."""


@hookimpl
def ryzen_settings():
    return KernelSettings


@hookimpl
def register_commands(cli):
    import click

    @cli.group("kernel")
    def kernel_group():
        """CPU features and the kernel plugin's execution choices."""

    @kernel_group.command("info")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def info(as_json):
        """What this CPU can do, from the OS and from torch."""
        cpu = detect()
        if as_json:
            click.echo(json.dumps(cpu.as_dict(), indent=2))
            return
        click.echo(f"CPU: {cpu.model}")
        click.echo(f"cores: {cpu.usable_cores} usable of {cpu.logical_cores} logical")
        click.echo("features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.features.items()))
        click.echo(f"torch capability: {cpu.torch_capability}; oneDNN: {'yes' if cpu.mkldnn else 'no'}")


def choose_precision(settings: KernelSettings) -> tuple[str, str]:
    """The training precision to use and why."""
    cpu = detect(mask=settings.mask_features)
    if settings.precision == "fp32":
        return "fp32", "fp32 requested"
    if cpu.native_bf16:
        return "bf16", f"native bf16 on {cpu.model}"
    if settings.precision == "bf16":
        return "bf16", "bf16 requested although the CPU has no native bf16 (emulated, likely slower)"
    return "fp32", "CPU has no native bf16 (no AVX-512 BF16 or AMX); bf16 would be emulated"


@hookimpl
def on_model_load(model, settings, record):
    import torch

    threads = settings.threads or detect().usable_cores
    torch.set_num_threads(threads)
    record("threads", intra_op=threads)


@hookimpl
def transform_forward(forward, settings, record):
    import torch

    precision, why = choose_precision(settings)
    record("precision", chosen=precision, reason=why)
    if precision == "fp32":
        return None

    def bf16_forward(input_ids, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(input_ids, targets)

    return bf16_forward
