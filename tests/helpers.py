"""Helpers shared by the core tests (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from ryzen_core.testing import TINY_OVERRIDES, tiny_sets  # noqa: F401  (tests import tiny_sets from here)

REPO = Path(__file__).resolve().parents[1]

# A run small enough for CI: the same tiny run plugin authors get from ryzen_core.testing.
TINY = list(TINY_OVERRIDES)


def make_distribution(root: Path, dist_name: str, entry_name: str, module_name: str, module_source: str,
                      attribute: str | None = None) -> None:
    """A minimal installed distribution on `root`: what pip would leave in site-packages; its entry point is
    the module, or `attribute` of it (a Plugin class)."""
    (root / f"{module_name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n")
    target = f"{module_name}:{attribute}" if attribute else module_name
    (info / "entry_points.txt").write_text(f"[ryzen.plugins]\n{entry_name} = {target}\n")
