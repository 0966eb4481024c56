"""`ryzen plugin new NAME`: write a complete plugin package to start from.

The files are templates shipped with ryzen_core (templates/plugin/, package data), filled in
with string.Template: a pyproject.toml with the `ryzen.plugins` entry point, a `Plugin`
subclass with settings and commented hooks, a README and tests on the ryzen_core.testing
fixtures that pass as generated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template
from typing import Iterator

from .errors import RyzenError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
TEMPLATE_SUFFIX = ".tmpl"


class ScaffoldError(RyzenError):
    """A bad plugin name or a target directory already in use: a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class PluginNames:
    """Every spelling of one plugin's name the generated files need."""

    name: str  # the entry point: what --plugins and the config section say
    distribution: str  # ryzen-plugin-NAME, what pip installs
    package: str  # ryzen_plugin_NAME, the import name
    module: str  # NAME as an identifier
    class_name: str  # NAME in CamelCase + Plugin: the Plugin subclass
    settings_name: str  # NAME in CamelCase + Settings: its settings class

    @classmethod
    def of(cls, name: str) -> "PluginNames":
        if not NAME_PATTERN.fullmatch(name):
            raise ScaffoldError(f"plugin name {name[:60]!r} must be a lowercase letter followed by up to 39 lowercase "
                                "letters, digits, '-' or '_'")
        module = name.replace("-", "_")
        camel = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", name) if part)
        return cls(name, f"ryzen-plugin-{name}", f"ryzen_plugin_{module}", module, f"{camel}Plugin",
                   f"{camel}Settings")


def _templates(root: Traversable, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(relative path parts, text) of every template under `root`."""
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _templates(entry, (*prefix, entry.name))
        elif entry.name.endswith(TEMPLATE_SUFFIX):
            yield (*prefix, entry.name[: -len(TEMPLATE_SUFFIX)]), entry.read_text(encoding="utf-8")


def _output_path(parts: tuple[str, ...], names: PluginNames) -> Path:
    """Where a template goes: `package/` is the import package; the tests are named after the plugin."""
    renamed = [names.package if part == "package" else part for part in parts[:-1]]
    filename = f"test_{names.module}.py" if parts[-1] == "test_plugin.py" else parts[-1]
    return Path(*renamed, filename)


def render(names: PluginNames) -> dict[Path, str]:
    """The generated files, by path relative to the plugin's directory."""
    values = {"name": names.name, "distribution": names.distribution, "package": names.package,
              "module": names.module, "class_name": names.class_name, "settings_name": names.settings_name}
    root = files("ryzen_core") / "templates" / "plugin"
    return {_output_path(parts, names): Template(text).substitute(values) for parts, text in _templates(root)}


def new_plugin(name: str, parent: Path) -> Path:
    """Write the plugin `name` into `parent/ryzen-plugin-NAME` (which must not exist, or be empty)."""
    names = PluginNames.of(name)
    target = Path(parent) / names.distribution
    if target.exists() and not target.is_dir():
        raise ScaffoldError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise ScaffoldError(f"{target} exists and is not empty: choose another --dir or name")
    generated = render(names)
    for relative, text in generated.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
