"""`ryzen kernel info` and `ryzen kernel tune`: what this CPU can do, and the tuning decision for a config."""
from __future__ import annotations

import json

import click

from ryzen_core import cpu_features, with_run_config


@click.group("kernel")
def kernel_group():
    """CPU features and the kernel plugin's execution choices."""


@kernel_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json):
    """What this CPU can do, from the OS and from torch: its computed peak and measured matmul FLOP/s."""
    from ryzen_core import gemm_rates, peak_flops

    cpu, peak, measured = cpu_features(), peak_flops(), gemm_rates()
    if as_json:
        click.echo(json.dumps(dict(cpu.as_dict(), peak=peak, measured_gemm=measured), indent=2))
        return
    click.echo(f"CPU: {cpu.model}")
    click.echo(f"cores: {cpu.usable_cores} usable of {cpu.logical_cores} logical, "
               f"{cpu.physical_cores or 'unknown'} physical")
    if cpu.caches:
        click.echo("caches: " + ", ".join(f"{k.removesuffix('_bytes')} {v // 1024} KiB" for k, v in cpu.caches.items()))
    click.echo("features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.features.items()))
    click.echo(f"torch capability: {cpu.torch_capability}; oneDNN: {'yes' if cpu.mkldnn else 'no'}")
    click.echo(f"peak fp32: {peak['fp32_flops'] / 1e9:.0f} GFLOP/s; peak bf16: {peak['bf16_flops'] / 1e9:.0f} GFLOP/s "
               f"({peak['bf16_unit']}); {peak['formula']}, {peak['fma_units_assumed']} FMA units per core assumed, "
               f"{peak['clock_hz'] / 1e9:.2f} GHz")
    click.echo("measured matmul: " + ", ".join(f"{d} {measured[d]['flops'] / 1e9:.0f} GFLOP/s" for d in ("fp32", "bf16")
                                               if measured.get(d)) + f" ({measured['method']})")


@kernel_group.command("tune")
@with_run_config("kernel")
@click.option("--retune", is_flag=True, help="Measure again even if a decision is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def tune(host, config, retune, as_json):
    """Time the execution choices on the configured model and batch shape; cache the decision.

    Precision and threads follow train.precision and train.threads (auto / unset: tuned)."""
    import torch

    from ryzen_core import build_model, load_data

    from .decision import decide
    from .report import decision_markdown

    settings = host.settings["kernel"]  # with_run_config("kernel") resolved them, defaults included
    if retune:
        settings = settings.model_copy(update={"retune": True})
    data = load_data(config)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, data.tokenizer.vocab_size)
    decision, source = decide(model, config, settings, cpu_features(mask=settings.mask_features), log_line=click.echo)
    click.echo(json.dumps(decision, indent=2, default=str) if as_json else decision_markdown(decision, source))
