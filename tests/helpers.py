"""Helpers shared by the core tests (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A run small enough for CI: tiny model, a dozen stdlib files, a few steps.
TINY = [
    "model.preset=tiny", "data.max_documents=12", "data.vocab_size=300", "data.seq_len=32",
    "train.batch_size=4", "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
    "train.checkpoint_every=3", "train.warmup_steps=2",
    "validate.prompt_len=8", "validate.new_tokens=4", "validate.batch_sizes=[1]", "validate.warmup=1",
    "validate.repeats=2", "validate.max_repeats=3", "validate.perplexity_batches=2",
]


def tiny_sets(*extra: str) -> list[str]:
    args = []
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def make_distribution(root: Path, dist_name: str, entry_name: str, module_name: str, module_source: str) -> None:
    """A minimal installed distribution on `root`: what pip would leave in site-packages."""
    (root / f"{module_name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[ryzen.plugins]\n{entry_name} = {module_name}\n")
