"""Every hook has a documentation heading and is exercised by at least one test."""
from __future__ import annotations

import inspect

from helpers import REPO
from ryzen_core import hookspecs

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "ryzen_spec")]


def test_hook_list_is_what_the_docs_say():
    assert len(HOOKS) == 12


def test_every_hook_has_a_docs_heading():
    docs = (REPO / "docs" / "plugins.md").read_text()
    missing = [h for h in HOOKS if f"### `{h}`" not in docs]
    assert missing == []


def test_every_hook_is_used_by_a_test():
    sources = "\n".join(p.read_text() for p in [*REPO.glob("tests/*.py"), *REPO.glob("plugins/*/tests/*.py"),
                                                   *REPO.glob("examples/*/tests/*.py")] if p.name != "test_hook_docs.py")
    plugin_sources = "\n".join(p.read_text() for p in [*REPO.glob("examples/*/ryzen_plugin_*/*.py"),
                                                         *REPO.glob("plugins/*/ryzen_plugin_*/*.py")])
    unused = [h for h in HOOKS if f"def {h}(" not in sources and f"def {h}(" not in plugin_sources]
    assert unused == []
