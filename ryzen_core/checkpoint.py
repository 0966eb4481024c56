"""Checkpoints that survive a kill at any moment and cannot be fooled on resume.

Layout of `<run_dir>/training_checkpoint/`:
  step-000300/model.safetensors   weights (safetensors: no pickle)
  step-000300/trainer_state.pt    optimizer, scheduler, RNG states (tensors and numbers only,
                                  read back with torch.load(weights_only=True))
  step-000300/state.json          step counters and the metrics history so far
  step-000300/manifest.json       size and sha256 of every file above, written last
  LATEST                          name of the newest complete step directory
  rejected-step-000600/           a checkpoint that failed verification on resume, kept as found

A step directory is written under a temporary name (`.step-000300.*`), fsynced and renamed;
LATEST is replaced atomically afterwards. A kill leaves either the old or the new checkpoint,
never half of one, and the temporary leftovers are removed on the next start.

Resume trusts nothing on disk: LATEST must name a step directory of this checkpoint
directory, the manifest must list exactly the files the loader reads with their size and
sha256, and state.json must have the trainer's schema. A checkpoint that fails is skipped
(and set aside, so nothing overwrites it) in favour of the newest earlier one that verifies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from safetensors.torch import load_model, save_model

from .errors import CheckpointError, writing

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "training_checkpoint"
CONFIG_FILE = "config.json"
KEEP = 2
LATEST = "LATEST"
MANIFEST = "manifest.json"
# Every file the loader reads; the manifest must vouch for each of them and nothing else.
CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt", "state.json")
STEP_DIR = re.compile(r"step-(\d{6,})")
REJECTED_PREFIX = "rejected-"
TRAINER_STATE_KEYS = {"optimizer", "scheduler", "torch_rng"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _FileEntry(_Strict):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


_MANIFEST = TypeAdapter(dict[str, _FileEntry])


class _Metrics(_Strict):
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    anomalies: list[dict[str, Any]]
    adaptations: list[dict[str, Any]]


class _Event(_Strict):
    plugin: str
    hook: str
    event: str
    data: dict[str, Any]


class SavedState(BaseModel):
    """What the trainer writes to state.json; keys added later by the trainer pass through."""

    model_config = ConfigDict(extra="allow", strict=True)

    label: str
    step: int = Field(ge=0)
    micro_batches: int = Field(ge=0)
    elapsed: float = Field(ge=0)
    best_val: float | None
    evals_since_best: int = Field(ge=0)
    metrics: _Metrics
    disabled: dict[str, str]
    events: list[_Event]
    plugin_settings: dict[str, dict[str, Any]]
    plugin_state: dict[str, dict[str, Any]] = {}  # each class plugin's state_dict (absent before API v1)


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
    """Write a small file so readers see either the old or the new content; OSError -> WriteError."""
    with writing(path):
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


def _step_number(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


def step_directories(root: Path) -> list[Path]:
    """The complete step directories under `root`, newest first (real directories only, no links)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=_step_number, reverse=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"step-{step:06d}"
    final = root / name
    with writing(final):  # a full disk ends in one line naming the checkpoint; the last good one stays
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        try:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "state.json").write_text(json.dumps(state))
            manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in CHECKPOINT_FILES}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for f in [*CHECKPOINT_FILES, MANIFEST]:
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # the same step of the same config written again: identical content
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(root / LATEST, name)
    for old in step_directories(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete what killed writes left behind (temporary step directories and LATEST files)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    orphans = [p for p in root.iterdir() if p.name.startswith(".") and
               (STEP_DIR.match(p.name[1:]) or p.name.startswith(f".{LATEST}."))]
    for orphan in orphans:
        if orphan.is_dir() and not orphan.is_symlink():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted checkpoint write", orphan)
    return orphans


# -- verification -----------------------------------------------------------------------
def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"corrupt checkpoint {path}: {problem}")


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def _read_json(path: Path, checkpoint: Path) -> Any:
    if path.is_symlink() or not path.is_file():  # a FIFO or a link to a device would hang or leave the run
        raise _corrupt(checkpoint, f"{path.name} is missing or not a regular file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise _corrupt(checkpoint, f"{path.name} is not readable JSON ({type(exc).__name__})") from None


def _check_file(checkpoint: Path, name: str, expected: _FileEntry) -> None:
    file = checkpoint / name
    if file.is_symlink() or not file.is_file():
        raise _corrupt(checkpoint, f"{name} is missing or not a regular file")
    size = file.stat().st_size
    if size != expected.bytes:
        raise _corrupt(checkpoint, f"{name} is truncated or corrupt ({size} bytes, expected {expected.bytes})")
    if _sha256(file) != expected.sha256:
        raise _corrupt(checkpoint, f"{name} does not match its sha256 in {MANIFEST}")


def verify(path: Path) -> dict[str, Any]:
    """Check a step directory against its manifest and schemas; return its state. CheckpointError if not."""
    path = Path(path)
    try:
        entries = _MANIFEST.validate_python(_read_json(path / MANIFEST, path))
    except ValidationError as exc:
        raise _corrupt(path, f"{MANIFEST} is not a mapping of file -> {{bytes, sha256}} ({_first_problem(exc)})") from None
    unexpected = sorted(set(entries) - set(CHECKPOINT_FILES))
    if unexpected:
        raise _corrupt(path, f"{MANIFEST} lists an unexpected file {unexpected[0][:60]!r}")
    for name in CHECKPOINT_FILES:
        if name not in entries:
            raise _corrupt(path, f"{MANIFEST} has no entry for {name}")
        _check_file(path, name, entries[name])
    try:
        return SavedState.model_validate(_read_json(path / "state.json", path)).model_dump()
    except ValidationError as exc:
        raise _corrupt(path, f"state.json does not have the trainer's schema ({_first_problem(exc)})") from None


# -- finding the checkpoint to resume from ------------------------------------------------
def _pointer_target(root: Path) -> tuple[Path | None, str]:
    """The step directory LATEST names, or None and why LATEST cannot be used."""
    pointer = root / LATEST
    if pointer.is_symlink() or (pointer.exists() and not pointer.is_file()):
        return None, f"{pointer} is not a regular file"
    try:
        with open(pointer, "rb") as f:
            raw = f.read(64)
    except FileNotFoundError:
        return None, f"{pointer} is missing"
    except OSError as exc:
        return None, f"{pointer} cannot be read ({exc.strerror})"
    name = raw.decode("ascii", errors="replace").strip()
    if not STEP_DIR.fullmatch(name):
        return None, f"{pointer} holds {name[:40]!r}, not the name of a step directory in {root}"
    target = root / name
    if target.is_symlink() or not target.is_dir():
        return None, f"{pointer} names {name}, which is not a directory in {root}"
    return target, ""


@dataclass
class ResumePoint:
    path: Path
    state: dict[str, Any]
    passed_over: list[tuple[Path, str]] = field(default_factory=list)
    """Newer step directories not used, and why (failed verification, or newer than LATEST)."""


def find_checkpoint(run_dir: Path) -> ResumePoint | None:
    """The checkpoint to resume from: what LATEST names if it verifies, else the newest earlier one that does.

    None when the run has no step directory at all; CheckpointError when none verifies.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    steps = step_directories(root)
    if not steps:
        return None
    target, why = _pointer_target(root)
    passed_over: list[tuple[Path, str]] = []
    failures: list[str] = []
    if target is None:
        log.warning("%s; looking for the newest step directory that verifies", why)
    else:
        passed_over = [(s, f"newer than {target.name}, which {LATEST} names") for s in steps
                       if _step_number(s) > _step_number(target)]
        steps = [s for s in steps if _step_number(s) <= _step_number(target)]
    for candidate in steps:
        try:
            state = verify(candidate)
        except CheckpointError as exc:
            passed_over.append((candidate, str(exc)))
            failures.append(str(exc))
            log.warning("%s; trying the checkpoint before it", exc)
            continue
        if passed_over or target is None:
            log.warning("resuming from %s", candidate)
        return ResumePoint(candidate, state, passed_over)
    raise CheckpointError(f"no checkpoint in {root} verifies ({len(failures)} tried); the newest: {failures[0]}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    point = find_checkpoint(run_dir)
    return point.path if point else None


def set_aside(point: ResumePoint) -> None:
    """Rename the step directories resume passed over, so training on never overwrites them."""
    for path, reason in point.passed_over:
        if not path.is_dir():
            continue
        target, n = path.with_name(REJECTED_PREFIX + path.name), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{REJECTED_PREFIX}{path.name}-{n}")
        os.rename(path, target)
        log.warning("kept %s as %s (%s)", path.name, target.name, reason)


# -- loading ----------------------------------------------------------------------------
def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights from a checkpoint directory (verified first) or a .safetensors file into `model`."""
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
    state = verify(path)
    try:
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as exc:
        raise _corrupt(path, f"cannot read trainer_state.pt ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(trainer_state, dict) or set(trainer_state) != TRAINER_STATE_KEYS:
        raise _corrupt(path, f"trainer_state.pt does not hold {sorted(TRAINER_STATE_KEYS)}")
    load_weights(model, path / "model.safetensors")
    return trainer_state, state


def saved_plugin_state(path: Path) -> dict[str, dict[str, Any]]:
    """Each class plugin's state_dict as a checkpoint directory saved it (verified first), for rebuilding
    plugin instances beside its model outside the trainer; {} for a directory that is no checkpoint
    (an `hf_model/` export carries no plugin state)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return {}
    return dict(verify(path).get("plugin_state") or {})


def saved_run_config(run_dir: Path) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); nothing to resume")
    return path
