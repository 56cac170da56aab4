#!/usr/bin/env bash
# Create .venv (once) and install polyrpc into it with the extras named by $1: by default
# test,fast (what scripts/test.sh needs); scripts/bench.sh asks for bench,fast only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip "setuptools>=77"  # 77: SPDX license (setup.py build_ext reads pyproject)
.venv/bin/python -m pip install --quiet -e ".[${1:-test,fast}]"
