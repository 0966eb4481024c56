"""A core-only install (issue 13): `ryzen-core` alone, with exactly the dependencies its pyproject
declares, runs `ryzen run` on a tiny model.

Nothing is downloaded: the fresh venv gets a copy of `ryzen_core` and symlinks to the distributions
this environment already has, for the declared requirements and, recursively, theirs. Anything the
core imports without declaring it is missing there, and the run fails naming it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO, tiny_sets
from import_rules import python_files, read_imports


def core_project() -> dict:
    """ryzen-core's [project] table, read now: its dependencies change as the core does."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def applies(requirement: Requirement) -> bool:
    """Whether a requirement holds here without any extra ("x; extra == 'test'" does not)."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def dependency_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that `requirements` need, theirs included, by normalized name."""
    closure: dict[str, metadata.Distribution] = {}
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in closure or not applies(requirement):
            continue
        try:
            closure[name] = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} is required (by ryzen-core or a dependency) but not installed here")
        pending += [Requirement(r) for r in closure[name].requires or []]
    return closure


def link_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Symlink what `dist` installed at the top of site-packages (packages, modules, its dist-info)."""
    if dist.files is None:
        pytest.fail(f"{dist.metadata['Name']} has no RECORD: cannot tell which files it installed")
    tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
    for top in sorted(tops):
        link = site / top
        if not link.exists():  # namespace packages (nvidia/, google/) are shared between distributions
            link.symlink_to(Path(dist.locate_file(top)).resolve())


def install_core(site: Path) -> None:
    """What `pip install ryzen-core` leaves: the package, and a dist-info with its requirements and script."""
    shutil.copytree(REPO / "ryzen_core", site / "ryzen_core", ignore=shutil.ignore_patterns("__pycache__"))
    project = core_project()
    info = site / f"ryzen_core-{project['version']}.dist-info"
    info.mkdir()
    requires = "".join(f"Requires-Dist: {r}\n" for r in project["dependencies"])
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
                                   f"{requires}")
    scripts = "".join(f"{name} = {target}\n" for name, target in project["scripts"].items())
    (info / "entry_points.txt").write_text(f"[console_scripts]\n{scripts}")


@pytest.fixture(scope="module")
def core_only_python(tmp_path_factory) -> Path:
    """The python of a fresh venv (no pip, no system site-packages) holding ryzen-core and its closure."""
    venv = tmp_path_factory.mktemp("core-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    install_core(site)
    for dist in dependency_closure(core_project()["dependencies"]).values():
        link_distribution(dist, site)
    return python


def run_in_venv(python: Path, *args: str, cache_dir: Path, cwd: Path):
    # -I: neither PYTHONPATH, the user's site-packages nor the working directory reach sys.path.
    env = {k: v for k, v in os.environ.items() if k != "RYZEN_LOAD_PLUGINS"}
    env.update(RYZEN_CACHE_DIR=str(cache_dir), CI="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([python, "-I", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=1800)


# ryzen_core.testing is the pytest plugin (entry point pytest11): only pytest loads it, and the `test`
# extra declares pytest for those who run plugin tests.
EXTRA_FOR = {"ryzen_core/testing.py": "test"}


def test_the_core_imports_only_what_it_declares():
    project = core_project()
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    providers = metadata.packages_distributions()
    undeclared = []
    for path in python_files(REPO / "ryzen_core"):
        extra = EXTRA_FOR.get(str(path.relative_to(REPO)))
        allowed = declared | {canonicalize_name(Requirement(r).name)
                              for r in project["optional-dependencies"].get(extra, [])}
        for imp in read_imports(path.read_text(encoding="utf-8")):
            top = imp.module.split(".")[0]
            if imp.type_checking or top in sys.stdlib_module_names or top == "ryzen_core":
                continue
            dists = {canonicalize_name(d) for d in providers.get(top, [])}
            if not dists & allowed:
                from_where = f"from {', '.join(sorted(dists))}" if dists else "installed by no distribution here"
                undeclared.append(f"  {path.relative_to(REPO)}:{imp.line}: {top} ({from_where})")
    assert not undeclared, "ryzen_core imports what its pyproject does not declare:\n" + "\n".join(undeclared)


@pytest.mark.slow
def test_no_plugin_is_importable_in_the_core_only_venv(core_only_python, cache_dir, tmp_path):
    plugin_packages = sorted(p.parent.name for p in REPO.glob("plugins/*/*/__init__.py"))
    assert "ryzen_plugin_onnx_export" in plugin_packages
    probe = ("import importlib.util, sys, ryzen_core; print(ryzen_core.__file__); "
             "print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])")
    found = run_in_venv(core_only_python, "-c", probe, *plugin_packages, cache_dir=cache_dir, cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-3000:]
    core_file, importable = found.stdout.splitlines()
    assert Path(core_file).is_relative_to(core_only_python.parents[1])  # the venv's copy, not the repository
    assert importable == "[]"
    onnx = run_in_venv(core_only_python, "-c", "import ryzen_plugin_onnx_export", cache_dir=cache_dir, cwd=tmp_path)
    assert onnx.returncode != 0 and "No module named 'ryzen_plugin_onnx_export'" in onnx.stderr


@pytest.mark.slow
def test_ryzen_run_on_a_tiny_model_with_the_core_alone(core_only_python, cache_dir, tmp_path):
    listing = run_in_venv(core_only_python, "-m", "ryzen_core.cli", "plugins", "--json", cache_dir=cache_dir,
                          cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert json.loads(listing.stdout) == []
    out = tmp_path / "run"
    result = run_in_venv(core_only_python, "-m", "ryzen_core.cli", "run", *tiny_sets(), "--out", str(out),
                         cache_dir=cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "report.md").is_file()
    assert json.loads((out / "environment.json").read_text())["versions"]["ryzen-core"] == core_project()["version"]
