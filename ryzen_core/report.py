"""What a run writes for machines (JSON, CSV) and for people (Markdown, PNG plots),
plus the environment fingerprint every report carries."""
from __future__ import annotations

import functools
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import atomic_write_text


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """py-cpuinfo's view of this CPU, read once per process: each read starts a subprocess (about 1 s)."""
    import cpuinfo

    return cpuinfo.get_cpu_info()


def cpu_description() -> dict[str, Any]:
    info = cpu_info()
    flags = set(info.get("flags", []))
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni", "avx512_bf16",
              "avx512bf16", "amx_bf16", "amx_int8", "amx_tile"]
    return {
        "model": info.get("brand_raw"),
        "vendor": info.get("vendor_id_raw"),
        "arch": info.get("arch"),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": sorted(f for f in wanted if f in flags),
    }


def environment(host=None) -> dict[str, Any]:
    """What the figures in a report were measured on."""
    import torch

    env = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {d: package_version(d) for d in ("ryzen-core", "torch", "transformers", "onnxruntime", "tokenizers")},
    }
    if host is not None:
        env["plugins"] = {name: {"distribution": r.distribution, "version": r.version, "status": r.status}
                          for name, r in host.records.items()}
    return env


def plot_loss_curves(runs: Mapping[str, Any], path: Path) -> None:
    """Training loss per step and validation loss per evaluation, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, metrics) in enumerate(runs.items()):
        colour = f"C{i}"
        steps = [s for s in metrics.steps if s["loss"] == s["loss"]]  # NaN != NaN drops skipped steps
        ax.plot([s["tokens"] for s in steps], [s["loss"] for s in steps], color=colour, alpha=0.35, lw=1)
        ax.plot([e["tokens"] for e in metrics.evals], [e["val_loss"] for e in metrics.evals], "o-", color=colour,
                label=f"{label} (validation)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss: faint = training steps, dots = validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
