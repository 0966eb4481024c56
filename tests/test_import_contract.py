"""The plugin API contract (issue 13): bundled plugins, with their tests and benchmarks, and the
example plugin import nothing from `ryzen_core.<submodule>` except `ryzen_core.testing`; what they
use comes from `ryzen_core` itself."""
from __future__ import annotations

import textwrap

import pytest

import ryzen_core
from helpers import REPO
from import_rules import contract_offences, core_submodules, python_files

SUBMODULES = core_submodules(REPO / "ryzen_core")
PUBLIC = set(ryzen_core.__all__)


def plugin_sources() -> list:
    """Every Python file of the bundled plugins and of the example (its build/ copy aside)."""
    roots = [p for p in sorted((REPO / "plugins").iterdir()) if p.is_dir()]
    roots.append(REPO / "examples" / "ryzen-plugin-label-smoothing")
    return [path for root in roots for path in python_files(root)]


def offences_in(tmp_path, source: str) -> list[str]:
    path = tmp_path / "plugin_module.py"
    path.write_text(textwrap.dedent(source))
    return [module for _, _, module in contract_offences(path, SUBMODULES, PUBLIC)]


def test_plugins_and_the_example_import_only_the_public_api():
    sources = plugin_sources()
    assert len(sources) > 20  # the walk found the plugins, their tests and the example
    offences = [o for path in sources for o in contract_offences(path, SUBMODULES, PUBLIC)]
    listing = "\n".join(f"  {path.relative_to(REPO)}:{line}: {module}" for path, line, module in offences)
    assert not offences, f"{len(offences)} imports reach past the plugin API:\n{listing}"


@pytest.mark.parametrize("source, internal", [
    ("from ryzen_core.run import prepare\n", "ryzen_core.run"),
    ("import ryzen_core.trainer as t\n", "ryzen_core.trainer"),
    ("import ryzen_core.models.build\n", "ryzen_core.models.build"),
    ("from ryzen_core.models import build\n", "ryzen_core.models"),
    ("from ryzen_core import backends\n", "ryzen_core.backends"),  # the same module by another spelling
    ("def later():\n    from ryzen_core.bench import run_bench\n", "ryzen_core.bench"),
    ("if TYPE_CHECKING:\n    from ryzen_core.config import RunConfig\n", "ryzen_core.config"),
    ("import importlib\nimportlib.import_module('ryzen_core.validator')\n", "ryzen_core.validator"),
])
def test_an_internal_import_is_an_offence_wherever_it_is_written(tmp_path, source, internal):
    assert offences_in(tmp_path, source) == [internal]


def test_the_offence_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from ryzen_core import hookimpl\n\n\nfrom ryzen_core.run import prepare\n")
    assert contract_offences(path, SUBMODULES, PUBLIC) == [(path, 4, "ryzen_core.run")]


def test_the_public_api_and_the_testing_module_pass(tmp_path):
    source = """
        import ryzen_core
        from ryzen_core import hookimpl, RunConfig, Trainer
        from ryzen_core import testing
        from ryzen_core.testing import tiny_config
        import ryzen_core.testing.fixtures
        from . import plugin
        from .ryzen_core.run import local_name
        import ryzen_core_extras.run
    """
    assert offences_in(tmp_path, source) == []


def test_a_submodule_exported_by_name_is_public(tmp_path):
    path = tmp_path / "uses_hardware.py"
    path.write_text("from ryzen_core import hardware\n")
    assert contract_offences(path, {"hardware", "run"}, {"hardware"}) == []
    assert contract_offences(path, {"hardware", "run"}, set()) == [(path, 1, "ryzen_core.hardware")]
