#!/usr/bin/env bash
# One-command developer setup: creates .venv/ (backend + tests + bpy 5.0.1), a second bpy
# (Blender 4.2 LTS) under .venv/blender42 for the cross-version tests, then builds and validates
# the extension zip. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
BPY42=4.2.23
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
if [ ! -f .venv/blender42/bpy/__init__.py ]; then
  .venv/bin/python -m pip install -q --no-deps --target .venv/blender42 "bpy==${BPY42}"
fi
.venv/bin/python build.py --check
echo "setup done: .venv ready, extension zip in dist/"
