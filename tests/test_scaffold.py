"""`ryzen plugin new`: the generated package installs, its tests pass as generated, `ryzen run` runs it;
a bad name or a directory in use is one line and exit 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ryzen_core.testing import tiny_sets


@pytest.mark.slow
def test_a_generated_plugin_installs_passes_its_tests_and_runs(tmp_path, ryzen_cli):
    made = ryzen_cli("plugin", "new", "demo", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    plugin_dir = tmp_path / "ryzen-plugin-demo"
    assert {p.relative_to(plugin_dir).as_posix() for p in plugin_dir.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "ryzen_plugin_demo/__init__.py", "ryzen_plugin_demo/plugin.py",
        "tests/test_demo.py"}

    # Installed beside the shared environment, not into it: nothing is downloaded, nothing else changes.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(plugin_dir)], check=True, capture_output=True, text=True)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=plugin_dir,
                           env=dict(os.environ, **env), capture_output=True, text=True, timeout=1800)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "4 passed" in tests.stdout

    # Only the selected plugin loads (RYZEN_LOAD_PLUGINS empty), as a user's fresh environment would.
    run = ryzen_cli("run", "--plugins", "demo", *tiny_sets(), "--out", str(tmp_path / "run"),
                    env=dict(env, RYZEN_LOAD_PLUGINS=""))
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## demo (optimized)" in report
    assert "demo: 6 optimizer steps with a z-loss of weight 0.0001" in report


@pytest.mark.parametrize("name, message", [
    ("Demo", "plugin name 'Demo' must be a lowercase letter"),
    ("9lives", "plugin name '9lives' must be a lowercase letter"),
    ("my plugin", "plugin name 'my plugin' must be a lowercase letter"),
    ("x" * 41, "must be a lowercase letter followed by up to 39"),
    ("../escape", "plugin name '../escape' must be a lowercase letter"),
])
def test_a_bad_name_is_one_line_and_exit_2(tmp_path, name, message):
    from click.testing import CliRunner

    from ryzen_core.cli import cli

    result = CliRunner().invoke(cli, ["plugin", "new", name, "--dir", str(tmp_path)], obj={"host": None})
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_directory_in_use_is_one_line_and_exit_2_and_an_empty_one_is_filled(tmp_path):
    from click.testing import CliRunner

    from ryzen_core.cli import cli

    used = tmp_path / "ryzen-plugin-demo"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["plugin", "new", "demo", "--dir", str(tmp_path)], obj={"host": None})
    assert result.exit_code == 2
    assert result.stderr == f"Error: {used} exists and is not empty: choose another --dir or name\n"
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    (used / "notes.txt").unlink()
    result = CliRunner().invoke(cli, ["plugin", "new", "demo", "--dir", str(tmp_path)], obj={"host": None})
    assert result.exit_code == 0, result.output
    text = (used / "pyproject.toml").read_text()
    assert 'demo = "ryzen_plugin_demo.plugin:DemoPlugin"' in text and 'name = "ryzen-plugin-demo"' in text
