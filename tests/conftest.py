"""Shared fixtures: a session-wide data cache and a helper to call the CLI the way a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session, so the tiny tokenizer is trained once."""
    return tmp_path_factory.mktemp("ryzen-cache")


@pytest.fixture
def ryzen(cache_dir):
    """Run `ryzen ARGS` in a subprocess; returns CompletedProcess with text output."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 1800):
        # The timeout only stops a hung command; a loaded machine is slow, not broken.
        full_env = dict(os.environ, RYZEN_CACHE_DIR=str(cache_dir), CI="1")
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "ryzen_core.cli", *args], capture_output=True, text=True,
                              env=full_env, cwd=cwd, timeout=timeout)

    return run
