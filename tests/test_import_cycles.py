"""No import cycles (issue 13): in `ryzen_core` and in each plugin package, no module imports,
directly or through others of its package, a module that imports it back. Function-level imports
count (a cycle hidden in a function still couples both ends); `if TYPE_CHECKING:` imports do not."""
from __future__ import annotations

import textwrap

import pytest

from helpers import REPO
from import_rules import import_graph, shortest_cycle, strongly_connected


def packages() -> list:
    """ryzen_core, each bundled plugin's import package and the example's."""
    found = [REPO / "ryzen_core"]
    for root in [*sorted((REPO / "plugins").iterdir()), REPO / "examples" / "ryzen-plugin-label-smoothing"]:
        found += sorted(p.parent for p in root.glob("*/__init__.py"))
    return found


def describe_cycles(package_dir) -> list[str]:
    """One line per cycle: the modules in order, each as `module:line` with the line that imports the next."""
    graph = import_graph(package_dir)
    lines = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component)
        steps = " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:]))
        extra = f"; the cycle's component also holds {', '.join(sorted(set(component) - set(cycle)))}" \
            if set(component) - set(cycle) else ""
        lines.append(f"{steps} -> {cycle[-1]}{extra}")
    return lines


def write_package(root, files: dict[str, str]):
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / next(iter(files)).split("/")[0]


def test_no_package_of_the_repository_has_an_import_cycle():
    found = packages()
    assert REPO / "ryzen_core" in found and len(found) >= 7  # the core, five plugins, the example
    cycles = [f"  {cycle}" for package in found for cycle in describe_cycles(package)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_cycle_through_relative_imports_is_found(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "from .models import build\n",
        "pkg/models/__init__.py": "",
        "pkg/models/build.py": "from .. import trainer\n",
        "pkg/trainer.py": "def fit():\n    from pkg.models.build import build  # a function-level import counts\n",
        "pkg/report.py": "from . import trainer\n",
    })
    graph = import_graph(package)
    assert strongly_connected(graph) == [["pkg.models.build", "pkg.trainer"]]
    assert describe_cycles(package) == [
        "pkg.models.build:1 -> pkg.trainer:2 -> pkg.models.build"]


def test_a_package_init_that_imports_its_submodule_back_is_a_cycle(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "from .plugin import hook\nVERSION = 1\n",
        "pkg/plugin.py": "from . import VERSION\n",  # a name from the package's own namespace
    })
    assert strongly_connected(import_graph(package)) == [["pkg", "pkg.plugin"]]


def test_imports_without_a_cycle_pass(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "from .errors import Oops\nfrom . import cli\n",
        "pkg/errors.py": "class Oops(Exception):\n    pass\n",
        "pkg/cli.py": "from . import errors\nfrom .models import build\nimport pkg.errors\n",
        "pkg/models/__init__.py": "from .build import build\n",
        "pkg/models/build.py": "from ..errors import Oops\nfrom typing import TYPE_CHECKING\n"
                               "if TYPE_CHECKING:\n    from pkg.cli import main  # never runs\n",
    })
    graph = import_graph(package)
    assert graph["pkg.cli"] == {"pkg.errors": 1, "pkg.models": 2, "pkg.models.build": 2}
    assert graph["pkg.models.build"] == {"pkg.errors": 1}
    assert strongly_connected(graph) == []


def test_an_import_through_a_package_runs_its_init(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub.b import thing\n",
        "pkg/sub/__init__.py": "from pkg.a import other\n",
        "pkg/sub/b.py": "thing = 1\n",
    })
    assert strongly_connected(import_graph(package)) == [["pkg.a", "pkg.sub"]]
