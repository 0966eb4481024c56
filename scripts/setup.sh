#!/usr/bin/env bash
# Create .venv (if needed) and install ryzen-core, the bundled plugins, the example
# plugin and the test tools into it. Safe to run again: it reinstalls only when a
# pyproject.toml changed. Needs Python 3.11+ and pip; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.ryzen-installed"
want=$(cat pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip "setuptools>=77"
    # torch is pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e ".[test]" \
        -e plugins/kernel_simd -e plugins/semantic_compression -e plugins/rlvr -e plugins/onnx_export -e plugins/speculative -e plugins/kv_cache -e "plugins/runtimes[ctranslate2]" \
        -e plugins/bitnet -e "plugins/serve[test]" -e examples/ryzen-plugin-label-smoothing
    echo "$want" > "$stamp"
fi
