"""`ryzen rlvr eval` on a run that is not an rlvr run refuses at once and writes nothing."""
from __future__ import annotations

from click.testing import CliRunner

from helpers import TINY
from ryzen_core.plugins import PluginHost
from ryzen_core.run import prepare, train_one
from ryzen_plugin_rlvr import plugin


def test_rlvr_eval_of_a_run_without_rlvr_is_refused_without_writing(tmp_path):
    from ryzen_core.cli import build_cli

    run_dir = tmp_path / "run"
    train_one(prepare(PluginHost(), None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}"], [], run_dir), PluginHost())
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    host = PluginHost()
    host.register(plugin, "rlvr")
    result = CliRunner().invoke(build_cli(host), ["rlvr", "eval", str(run_dir), "--no-throughput",
                                                  "--set", "rlvr.eval_problems=4", "--set", "rlvr.eval_paths=[1]"],
                                obj={"host": host})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"{run_dir} is not an rlvr run (its plugins: none)" in result.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
