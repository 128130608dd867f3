#!/usr/bin/env bash
# Set up ngkit in ./.venv: torch first (the CPU wheel this machine holds, or PyPI's build
# elsewhere), then ngkit, its built-in plugins, the test tools, the library quantizers
# (vector-quantize-pytorch) and the experiment trackers (TensorBoard, W&B) with torch pinned by
# constraints.txt, so pip never swaps torch for a multi-GB CUDA build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "ngkit needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==$(sed -n 's/^torch==//p' constraints.txt)"
pip_install -c constraints.txt -e ".[test,quantizers,trackers]"
# optional: libjpeg-turbo straight to RGB (ngkit.imaging); Pillow decodes when it is missing
pip_install -c constraints.txt -e ".[jpeg]" || echo "simplejpeg did not install: JPEGs decode with Pillow" >&2
echo "ngkit installed in $(pwd)/.venv" >&2
