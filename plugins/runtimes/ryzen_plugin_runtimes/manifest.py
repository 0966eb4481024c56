"""`runtime.json`: what an export directory of this plugin holds, so `load_backend(path)` needs nothing else."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ryzen_core import RyzenError

MANIFEST_FILE = "runtime.json"
FORMAT = "ryzen-runtimes/1"


class EngineSkipped(Exception):
    """An engine (or one precision of it) cannot be built here; the message says why, for the report."""


class RuntimeExportError(RyzenError):
    """An export directory of this plugin is damaged or incomplete."""


def write_manifest(directory: Path, engine: str, precision: str, **details: Any) -> Path:
    manifest = {"format": FORMAT, "engine": engine, "precision": precision, **details}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: str | Path | None) -> dict[str, Any] | None:
    """The manifest of one of our export directories, or None when `directory` is not one."""
    if directory is None:
        return None
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeExportError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    for key in ("engine", "precision", "name"):
        if not isinstance(manifest.get(key), str):
            raise RuntimeExportError(f"{path} has no {key!r}")
    return manifest


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
