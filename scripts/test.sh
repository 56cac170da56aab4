#!/usr/bin/env bash
# Set up, then run every test: the unit, conformance, RPC, interop and CLI suites on this
# machine, and the RDMA suite inside the soft-RoCE VM when qemu and root are available.
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1

# transports that must be usable here: a missing one fails the run instead of silently
# dropping out of the parametrised suites
export POLYRPC_REQUIRE_TRANSPORTS=${POLYRPC_REQUIRE_TRANSPORTS:-tcp,tls,unix,mem,quic,kcp}

.venv/bin/python -m ruff check polyrpc tests || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 5
fi
exit "$status"
