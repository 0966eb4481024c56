"""`ryzen serve` on the command line: registered by the plugin's hook; a directory without a model is one line, exit 2."""
from __future__ import annotations


def test_register_commands_adds_serve(ryzen):
    result = ryzen("serve", "--help")
    assert result.exit_code == 0 and "/v1/completions" in result.output


def test_a_directory_without_a_model_is_one_line_and_exit_2(ryzen, tmp_path):
    for path in (tmp_path / "missing", tmp_path):
        result = ryzen("serve", str(path))
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert str(path) in result.stderr
