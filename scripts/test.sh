#!/usr/bin/env bash
# Set up, then run every test: the unit, conformance, RPC, interop and CLI suites on this
# machine, then the RDMA suite with real verbs inside the soft-RoCE VM (vm/rdma-vm.sh) when
# this host can run it (root, x86_64, apt). In CI (CI=true) a missing VM is a failure.
# Extra arguments go to the host pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1

# transports that must be usable here: a missing one fails the run instead of silently
# dropping out of the parametrised suites
export POLYRPC_REQUIRE_TRANSPORTS=${POLYRPC_REQUIRE_TRANSPORTS:-tcp,tls,unix,mem,quic,kcp}

.venv/bin/python -m ruff check polyrpc tests bench || exit 1
.venv/bin/python -m ruff format --check polyrpc tests bench || exit 1

# the RDMA tests need an RDMA device and the netem bench test kernel netem: they run in the VM
# below, not on the host
.venv/bin/python -m pytest --ignore=tests/test_rdma_transport.py \
    --ignore=tests/test_bench_netem.py "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 5
fi

if reason=$(vm/rdma-vm.sh check); then
    vm/rdma-vm.sh test || status=1
elif [ "${CI:-}" = true ]; then
    echo "the RDMA suite cannot run here: $reason" >&2
    status=1
else
    echo "RDMA suite NOT run: $reason. Run it with: sudo vm/rdma-vm.sh test" >&2
fi
exit "$status"
