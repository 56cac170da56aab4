#!/bin/sh
# Runs inside the VM: the RDMA test suite on one device (rxe0 -> rxe0), then across the veth
# pair (rxe1 -> rxe0). Exit status 0 only if both runs pass.
export PY_COLORS=0
export POLYRPC_REQUIRE_TRANSPORTS=rdma POLYRPC_TEST_TRANSPORTS=rdma POLYRPC_RDMA_LISTEN=10.77.0.1
rc=0
echo "polyrpc-vm: == rdma on one device: rxe0 (10.77.0.1) -> rxe0 (10.77.0.1)"
python3 -m pytest -p no:cacheprovider -q "$@" || rc=1
echo "polyrpc-vm: == rdma across two devices: rxe1 (10.77.0.2) -> rxe0 (10.77.0.1) over veth"
POLYRPC_RDMA_DIAL_SRC=10.77.0.2 python3 -m pytest -p no:cacheprovider -q "$@" || rc=1
exit $rc
