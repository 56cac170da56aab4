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
# etcd for tests/test_cluster_etcd.py (test installs only): Debian's etcd-server, where apt
# exists and we may use it
if [[ ",${1:-test,fast}," == *,test,* ]] && ! command -v etcd >/dev/null && command -v apt-get >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
    "${SUDO[@]}" apt-get install -y -q etcd-server >/dev/null 2>&1 \
        || { "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 && "${SUDO[@]}" apt-get install -y -q etcd-server >/dev/null 2>&1; } \
        || echo "setup.sh: could not install etcd-server (the etcd cluster tests will skip; CI=true fails them)" >&2
fi
