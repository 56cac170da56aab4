#!/bin/sh
# Runs inside the VM: `polyrpc bench` rows for tcp and rdma (latency, echo bulk, one-way
# stream), then perftest's ib_send_lat and ib_send_bw on the same device as the ceiling, then
# the ratios. Extra arguments go to the bench.
export PY_COLORS=0 POLYRPC_RDMA_LISTEN=10.77.0.1
# (through a file: not a terminal, so no progress animation on the serial console)
python3 -m polyrpc.cli bench --transports tcp,rdma --workloads latency,bulk,stream \
    --json /results/bench.json "$@" >/tmp/bench.out 2>&1
rc=$?
cat /tmp/bench.out
[ $rc = 0 ] || exit $rc
python3 -m polyrpc.bench.perftest --ip 10.77.0.1 --dev rxe0 --lat-size 64 --bw-size 1048576 \
    --json /results/perftest.json --compare /results/bench.json || exit 1
