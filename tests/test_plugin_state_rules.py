"""Bundled plugins keep state on their per-variant instance: no module-level mutable state, nothing stuck
on models (Plugin API v1). The check reads the source (ast), so it holds for code paths tests never run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "discard",
            "remove", "__setitem__"}
REGISTRIES = {"WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}
MODEL_NAMES = {"model", "module", "self.model"}


def package_files() -> list[Path]:
    roots = [*REPO.glob("plugins/*/ryzen_plugin_*"), *REPO.glob("examples/*/ryzen_plugin_*")]
    return sorted(p for root in roots for p in root.rglob("*.py") if "build" not in p.parts)


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def state_offences(source: str) -> list[tuple[int, str]]:
    """(line, what) for each module-level name that code mutates, each weak registry at module level,
    each `global` rebinding, and each attribute set on a model from outside it."""
    tree = ast.parse(source)
    module_names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    offences = []
    for node in tree.body:
        value = getattr(node, "value", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, ast.Call) \
                and _name(value.func).split(".")[-1] in REGISTRIES:
            offences.append((node.lineno, f"module-level {_name(value.func)}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            offences.append((node.lineno, f"global {', '.join(node.names)}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in module_names:
            offences.append((node.lineno, f"{node.func.value.id}.{node.func.attr}() mutates a module-level object"))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                base = target.value if isinstance(target, (ast.Subscript, ast.Attribute)) else None
                if isinstance(target, ast.Subscript) and isinstance(base, ast.Name) and base.id in module_names:
                    offences.append((node.lineno, f"{base.id}[...] = mutates a module-level object"))
                # A public attribute is a submodule swapped in place (allowed); a private one is bookkeeping.
                if isinstance(target, ast.Attribute) and _name(base) in MODEL_NAMES and target.attr.startswith("_"):
                    offences.append((node.lineno, f"sets {_name(target)} on a model"))
        if isinstance(node, ast.Call) and _name(node.func) == "setattr" and node.args \
                and _name(node.args[0]) in MODEL_NAMES:
            offences.append((node.lineno, f"setattr({_name(node.args[0])}, ...) on a model"))
        if isinstance(node, ast.Subscript) and _name(node.value).endswith(".__dict__") \
                and _name(node.value).split(".")[0] in {"model", "module"}:
            offences.append((node.lineno, f"{_name(node.value)}[...] on a model"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault" \
                and _name(node.func.value).endswith(".__dict__"):
            offences.append((node.lineno, f"{_name(node.func.value)}.setdefault() on a model"))
    return sorted(set(offences))


def test_no_bundled_plugin_keeps_module_level_state_or_sticks_attributes_on_models():
    found = [f"{path.relative_to(REPO)}:{line}: {what}" for path in package_files()
             for line, what in state_offences(path.read_text())]
    assert found == [], "state outside the plugin instance:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("import weakref\nSTATES = weakref.WeakKeyDictionary()\n", "module-level weakref.WeakKeyDictionary"),
    ("CACHE = {}\ndef f(k):\n    CACHE[k] = 1\n", "CACHE[...] = mutates a module-level object"),
    ("SEEN = []\ndef f(x):\n    SEEN.append(x)\n", "SEEN.append() mutates a module-level object"),
    ("n = 0\ndef f():\n    global n\n    n += 1\n", "global n"),
    ("def f(model):\n    model.__dict__.setdefault('_x', 1)\n", "model.__dict__.setdefault() on a model"),
    ("def f(model):\n    model._compression = 1\n", "sets model._compression on a model"),
    ("def f(model):\n    setattr(model, 'x', 1)\n", "setattr(model, ...) on a model"),
])
def test_the_state_check_catches_each_kind(source, expected):
    assert expected in [what for _, what in state_offences(source)]


def test_the_state_check_leaves_constants_and_instance_state_alone():
    source = ("TABLE = {'a': 1}\ndef swap(model, head):\n    model.lm_head = head\nclass P:\n    def __init__(self):\n        self.seen = {}\n"
              "    def f(self, k):\n        self.seen[k] = TABLE['a']\n        local = {}\n        local[k] = 1\n")
    assert state_offences(source) == []
