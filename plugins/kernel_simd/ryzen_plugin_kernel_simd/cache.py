"""The on-disk record of autotuning decisions.

A decision holds only for the CPU, model shape and library versions it was measured with, so
the file name is a hash of all three (plus the tuning settings). A changed key simply misses
and the next run tunes again; an unreadable file counts as a miss, never as an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from ryzen_core import package_version, write_json

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "ryzen-plugin-kernel-simd": package_version("ryzen-plugin-kernel-simd")}


def model_shape(model: torch.nn.Module, batch_size: int, seq_len: int) -> dict[str, Any]:
    """The model class, a digest of every parameter's name, shape and dtype, and the batch shape."""
    params = hashlib.sha256()
    for name, p in model.named_parameters():
        params.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return {"model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "parameter_digest": params.hexdigest()[:16], "batch_size": batch_size, "seq_len": seq_len}


def cache_key(cpu_signature: dict, shape: dict, versions: dict, tuning: dict) -> str:
    blob = json.dumps({"cpu": cpu_signature, "shape": shape, "versions": versions, "tuning": tuning},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class DecisionCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            decision = json.loads(path.read_text())
            if decision.get("key") != key or not isinstance(decision.get("chosen"), dict):
                raise ValueError("not a tuning decision for this key")
            return decision
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable tuning cache %s (%s); tuning again", path, exc)
            return None

    def store(self, key: str, decision: dict[str, Any]) -> Path:
        path = self.path(key)
        write_json(path, dict(decision, key=key))  # atomic: a killed run leaves the old file or none
        return path
