"""Checkpoints that survive a kill at any moment.

Layout of `<run_dir>/training_checkpoint/`:
  step-000300/model.safetensors   weights (safetensors: no pickle)
  step-000300/trainer_state.pt    optimizer, scheduler, RNG states (tensors and numbers only,
                                  read back with torch.load(weights_only=True))
  step-000300/state.json          step counters and the metrics history so far
  step-000300/manifest.json       size and sha256 of every file above, written last
  LATEST                          name of the newest complete step directory

A step directory is written under a temporary name, fsynced and renamed; LATEST is
replaced atomically afterwards. A kill leaves either the old or the new checkpoint,
never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .errors import CheckpointError

CHECKPOINT_DIR = "training_checkpoint"
CONFIG_FILE = "config.json"
KEEP = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so readers see either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        files = ["model.safetensors", "trainer_state.pt", "state.json"]
        manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in [*files, "manifest.json"]:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # a re-run of the same step after resume replaces its older copy
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "LATEST", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINT_DIR / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} named in {pointer} is missing")
    return path


def verify(path: Path) -> dict[str, Any]:
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable manifest ({exc.__class__.__name__})") from None
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupt ({size} bytes, expected {expected['bytes']})")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupt (sha256 mismatch)")
    return manifest


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights from a checkpoint directory (or a .safetensors file) into `model`."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / "model.safetensors"
    if path.is_dir():
        verify(path)
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights from {file}: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {file} do not fit the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights into `model`; return (trainer_state, state) for the trainer to restore."""
    load_weights(model, path)
    try:
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    return trainer_state, state


def saved_run_config(run_dir: Path) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); nothing to resume")
    return path
