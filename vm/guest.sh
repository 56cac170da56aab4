#!/bin/sh
# Runs inside the VM (from the shared checkout): brings up rxe0 and rxe1 on a veth pair with the
# policy routing soft-RoCE needs, builds the C extensions in a RAM overlay of the checkout, runs
# the host's command file, and records its exit status.
set -u
log() { echo "polyrpc-vm: $*"; }

setup_rdma() {
    modprobe -a veth rdma_rxe ib_uverbs rdma_ucm || return 1
    ip link set lo up || return 1
    ip link add veth0 type veth peer name veth1 || return 1
    ip addr add 10.77.0.1/24 dev veth0 && ip addr add 10.77.0.2/24 dev veth1 || return 1
    ip link set veth0 up && ip link set veth1 up || return 1
    # Both addresses are local and rxe drops packets that arrive on lo: route each direction
    # out of the other end of the veth pair instead.
    ip rule add pref 100 table local && ip rule del pref 0 table local || return 1
    ip rule add pref 10 iif lo from 10.77.0.2 to 10.77.0.1 table 101 || return 1
    ip rule add pref 10 iif lo from 10.77.0.1 to 10.77.0.2 table 100 || return 1
    ip route add 10.77.0.1 dev veth1 src 10.77.0.2 table 101 || return 1
    ip route add 10.77.0.2 dev veth0 src 10.77.0.1 table 100 || return 1
    rdma link add rxe0 type rxe netdev veth0 || return 1
    rdma link add rxe1 type rxe netdev veth1 || return 1
    # Ports need a moment to become ACTIVE after the links are added.
    i=0
    while [ $i -lt 50 ]; do
        if [ "$(rdma link show 2>/dev/null | grep -c 'state ACTIVE')" -ge 2 ]; then
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

build_extensions() {
    # The checkout is shared read-only: lay a RAM overlay on it and build the C extensions
    # (the KCP core and the frame codec) in place with the guest's own compiler and Python,
    # so they never depend on whether the host's build happens to load here.
    modprobe overlay || return 1
    mkdir -p /tmp/overlay/upper /tmp/overlay/work || return 1
    mount -t overlay overlay \
        -o lowerdir=/project,upperdir=/tmp/overlay/upper,workdir=/tmp/overlay/work /project ||
        return 1
    cd /project || return 1
    python3 setup.py -q build_ext --inplace --force --build-temp /tmp/build-ext \
        >/tmp/build-ext.log 2>&1 || { tail -n 20 /tmp/build-ext.log; return 1; }
    python3 -c 'import polyrpc.wire._frames, polyrpc.session._routing, polyrpc.rpc._callserver
import polyrpc.transports.kcp._kcp' || return 1
}

log "kernel $(uname -r), $(nproc) cpu(s)"
if ! setup_rdma; then
    log "soft-RoCE setup failed"
    rdma link show
    echo 98 > /results/status
    exit 0
fi
rdma link show
start=$(date +%s)
if ! build_extensions; then
    log "building the C extensions failed"
    echo 97 > /results/status
    exit 0
fi
log "C extensions built in $(($(date +%s) - start)) s"

export POLYRPC_IN_RDMA_VM=1
export POLYRPC_RDMA_IP0=10.77.0.1
export POLYRPC_RDMA_IP1=10.77.0.2
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=/project
export HOME=/root
cd /project || exit 0
log "running: $(cat /results/cmd)"
sh /results/cmd
rc=$?
log "exit status $rc"
echo $rc > /results/status
