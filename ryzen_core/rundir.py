"""The run directory: created (or refused) before any work, locked while a run writes to it,
and never shared by two configs.

A directory holds one run. Writing a second, different config into it would leave files that
mix the two, and `--resume` would continue one run's weights under the other's settings; so a
non-empty directory is accepted only when its saved `config.json` matches, and `--resume`
only continues a run with the config it was started with.
"""
from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .checkpoint import CONFIG_FILE, atomic_write_text, saved_run_config
from .config import CORE_SECTIONS, RunConfig
from .errors import ConfigError

LOCK_FILE = ".ryzen.lock"
# Settings that say where a run writes or caches, not what it computes: they may differ.
NOT_COMPARED = {"output.dir", "data.cache_dir", "model.hf_overrides"}  # overrides are derived, not given

_held: dict[Path, int] = {}  # directory -> descriptor of its lock, kept until the process ends


def run_directory(config: RunConfig) -> Path:
    """The run directory, created if needed; a bad --out (a file, an impossible place) is exit 2."""
    if config.output.dir is None:
        config.output.dir = Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(config.output.dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create the run directory ({exc.strerror or exc})") from None
    return path


def _lock(path: Path) -> None:
    key = path.resolve()
    if key in _held:  # this process holds it already (an earlier run in the same process)
        return
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write in the run directory ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{path} is in use by another ryzen process; wait for it or choose another --out") from None
    _held[key] = fd


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _what_it_computes(dump: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's results: core sections and the selected plugins' sections."""
    plugins = dump.get("plugins") if isinstance(dump.get("plugins"), list) else []
    sections = {k: v for k, v in dump.items() if k in CORE_SECTIONS or k in plugins}
    return {k: v for k, v in _flatten(sections) if k not in NOT_COMPARED}


def config_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """`key: saved -> now` for every setting that differs (values cut short)."""
    before = _what_it_computes(saved)
    now = _what_it_computes(json.loads(json.dumps(config.dump(), default=str)))
    cut = lambda v: (s if len(s := json.dumps(v)) <= 40 else s[:37] + "...")  # noqa: E731
    return [f"{k}: {cut(before.get(k))} -> {cut(now.get(k))}" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]


def _check_config(path: Path, config: RunConfig, resume: bool) -> None:
    saved_file = saved_run_config(path) if resume else path / CONFIG_FILE
    if not saved_file.is_file():
        if any(p.name != LOCK_FILE for p in path.iterdir()):
            raise ConfigError(f"--out {path} is not empty and holds no ryzen run ({CONFIG_FILE}); "
                              "choose a new or empty directory")
        return
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{saved_file} is unreadable ({type(exc).__name__}); choose another --out") from None
    differences = config_differences(saved if isinstance(saved, dict) else {}, config)
    if not differences:
        return
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    if resume:
        raise ConfigError(f"--resume {path}: the config differs from the one the run started with ({shown}); "
                          "a resumed run keeps its config")
    raise ConfigError(f"--out {path} holds a run with a different config ({shown}); continue it with "
                      f"`ryzen train --resume {path}` or choose another --out")


def claim_run_directory(config: RunConfig, resume: bool = False) -> Path:
    """Create and lock the run directory for the rest of this process, check that it holds no other
    run (or, resuming, the same one) and save the config. Every refusal is a one-line exit 2."""
    path = run_directory(config)
    _lock(path)
    _check_config(path, config, resume)
    if not resume:
        atomic_write_text(path / CONFIG_FILE, json.dumps(config.dump(), indent=2, default=str))
    return path
