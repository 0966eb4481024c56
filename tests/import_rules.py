"""What a module imports, read from its source with `ast`, and the two rules built on it: the
plugin API contract (plugins import only `ryzen_core` itself and `ryzen_core.testing`) and the
import graph of one package that the cycle check walks.

Every import counts, wherever it is written (module level, inside functions, `importlib.import_module`
with a literal name), because a function-level import of an internal module breaks a plugin just the
same when the core renames it, only later.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

CORE = "ryzen_core"
CORE_TESTING = "ryzen_core.testing"
SKIPPED_DIRS = {"build", "__pycache__"}  # build/ holds setuptools' copies of the package


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute, with relative imports resolved against the importing module
    names: tuple[str, ...]  # what `from module import ...` names; () for `import module`
    type_checking: bool  # written under `if TYPE_CHECKING:`, so never run


def python_files(root: Path) -> list[Path]:
    """Every .py file under root, outside build/ and __pycache__/."""
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _literal_import_module(call: ast.Call) -> str | None:
    """The module named by `import_module("x")`, `importlib.import_module("x")` or `__import__("x")`."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def _resolve(module: str | None, level: int, importer: str, importer_is_package: bool) -> str | None:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if level == 0:
        return module
    parts = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    if level > len(parts):
        return None  # beyond the top-level package: Python refuses it too
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def read_imports(source: str, importer: str = "", importer_is_package: bool = False) -> list[Import]:
    """Every import in `source`; relative ones resolved against the module named `importer`."""
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name, (), type_checking) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module, node.level, importer, importer_is_package)
            if module:
                found.append(Import(node.lineno, module, tuple(a.name for a in node.names), type_checking))
        elif isinstance(node, ast.Call) and (module := _literal_import_module(node)):
            found.append(Import(node.lineno, module, (), type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(source), False)
    return found


# --- the plugin API contract ---------------------------------------------------------------------

def core_submodules(core_dir: Path) -> set[str]:
    """The names of ryzen_core's own submodules and subpackages (`run`, `models`, ...)."""
    return {p.stem for p in core_dir.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in core_dir.iterdir() if (p / "__init__.py").is_file()}


def _is_testing(module: str) -> bool:
    return module == CORE_TESTING or module.startswith(CORE_TESTING + ".")


def contract_offences(path: Path, submodules: set[str], public: set[str]) -> list[tuple[Path, int, str]]:
    """(file, line, module) for each import in `path` that reaches past the public API.

    Allowed: `import ryzen_core`, `from ryzen_core import X` (unless X is an internal submodule, which
    would be `ryzen_core.X` by another spelling), and anything under `ryzen_core.testing`.
    """
    offences = []
    for imp in read_imports(path.read_text(encoding="utf-8")):
        if imp.module == CORE:
            offences += [(path, imp.line, f"{CORE}.{name}") for name in imp.names
                         if name in submodules and name not in public and name != "testing"]
        elif imp.module.startswith(CORE + ".") and not _is_testing(imp.module):
            offences.append((path, imp.line, imp.module))
    return offences


# --- the import graph of one package -------------------------------------------------------------

def package_modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every module of the package in package_dir."""
    root = package_dir.parent
    modules = {}
    for path in python_files(package_dir):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _known_prefix(module: str, modules: dict) -> str | None:
    """The longest prefix of `module` that is a module of the graph (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _targets(imp: Import, modules: dict) -> tuple[set[str], set[str]]:
    """The graph's modules that executing `imp` runs: (the ones it names, the packages on the way,
    whose `__init__` runs before their submodules)."""
    submodules = {f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules}
    named = set(submodules)
    prefix = _known_prefix(imp.module, modules)
    # `import x`, or `from x import name` where a name is not a submodule, uses x itself.
    if prefix and (not imp.names or len(submodules) < len(imp.names)):
        named.add(prefix)
    reached = named | ({prefix} if prefix else set())
    on_the_way = {a for target in reached for a in _ancestors(target) if a in modules} | reached
    return named, on_the_way - named


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {module of the same package it imports at run time: line of the first such import}.

    Imports under `if TYPE_CHECKING:` never run and are left out. The packages a module lives in are
    already being imported when it runs, so an edge to one counts only when the module names it (or
    a name from its namespace) explicitly.
    """
    modules = package_modules(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        edges = graph.setdefault(name, {})
        own_packages = set(_ancestors(name))
        for imp in read_imports(path.read_text(encoding="utf-8"), name, is_package):
            if imp.type_checking:
                continue
            named, on_the_way = _targets(imp, modules)
            for target in named | (on_the_way - own_packages):
                if target != name:
                    edges.setdefault(target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as a path that returns to where it began."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if target in members and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise ValueError(f"{component} is not strongly connected")
