"""The core tests' fixture names for the kit plugin authors get from ryzen_core.testing (a pytest plugin)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(ryzen_cache_dir) -> Path:
    """One data cache for the whole session, so the tiny tokenizer is trained once."""
    return ryzen_cache_dir


@pytest.fixture
def ryzen(ryzen_cli):
    """Run `ryzen ARGS` in a subprocess; returns CompletedProcess with text output."""
    return ryzen_cli
