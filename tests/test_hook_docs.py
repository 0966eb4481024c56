"""docs/plugins.md matches the hook specs, and every hook has a test named for it."""
from __future__ import annotations

import inspect
import re

from ryzen_core import hookspecs
from ryzen_core.testing import HOOKS as RECORDED_HOOKS

from helpers import REPO

SPECS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "ryzen_spec")}
DOCS = (REPO / "docs" / "plugins.md").read_text()


def documented_signature(hook: str, docs: str = DOCS) -> list[str] | None:
    """The argument names in the first `hook(...)` line under the hook's heading."""
    section = docs.split(f"### `{hook}`", 1)
    if len(section) < 2:
        return None
    match = re.search(rf"`{hook}\(([^)]*)\)", section[1])
    return None if match is None else [a.strip() for a in match.group(1).split(",") if a.strip()]


def test_every_hook_is_documented_with_the_signature_of_its_spec():
    wrong = {hook: (documented_signature(hook), list(inspect.signature(spec).parameters))
             for hook, spec in SPECS.items()
             if documented_signature(hook) != list(inspect.signature(spec).parameters)}
    assert wrong == {}, "documented vs spec: " + repr(wrong)


def test_the_documentation_checker_sees_a_wrong_signature():
    edited = DOCS.replace("`on_infer(generate, model,", "`on_infer(model,")
    assert documented_signature("on_infer", edited) == ["model", "tokenizer", "config", "settings", "record", "context"]
    assert documented_signature("on_infer", DOCS)[0] == "generate"


def test_every_hook_has_a_test_named_for_it():
    names = set()
    for path in [*REPO.glob("tests/*.py"), *REPO.glob("plugins/*/tests/*.py"), *REPO.glob("examples/*/tests/*.py")]:
        names.update(re.findall(r"def (test_\w+)\(", path.read_text()))
    untested = [hook for hook in SPECS if not any(hook in name for name in names)]
    assert untested == []


def test_the_hook_recorder_records_every_per_variant_hook():
    assert set(RECORDED_HOOKS) == set(SPECS) - {"ryzen_settings", "register_commands", "load_backend"}
