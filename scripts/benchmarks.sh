#!/usr/bin/env bash
# Regenerate docs/benchmarks.md from a fresh run: a loopback sweep over every usable transport
# and the reference rows, then the same rows through an impaired path (loss, delay, jitter,
# rate) by user-space relays here and by kernel netem in the soft-RoCE VM, the JSON kept in
# docs/bench/, the plots in docs/img/, the page written by polyrpc/bench/report.py.
# BENCH_SECONDS / BENCH_REPEAT (VM_SECONDS / VM_REPEAT in the VM) shorten or lengthen the run;
# BENCH_SKIP_SETUP=1 PYTHON=python uses the current environment instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${BENCH_SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
    pip_extra=$(.venv/bin/python -c "import matplotlib" 2>/dev/null || echo missing)
    if [ -n "$pip_extra" ]; then .venv/bin/python -m pip install --quiet -e ".[plot]"; fi
fi
PY=${PYTHON:-.venv/bin/python}
SECONDS_PER_POINT=${BENCH_SECONDS:-2}
REPEAT=${BENCH_REPEAT:-3}
mkdir -p docs/bench docs/img

# a failed point is recorded in the JSON and shown on the page, so it does not stop the script
"$PY" -m polyrpc.cli bench --sizes 64,1K,64K,1M,16M --in-flight 1,16,128 \
    --seconds "$SECONDS_PER_POINT" --repeat "$REPEAT" \
    --json docs/bench/loopback.json --plot docs/img/bench-loopback.png || true
"$PY" -m polyrpc.cli bench --loss 1% --delay 20ms --jitter 5ms --rate 100mbit \
    --seconds "$SECONDS_PER_POINT" --repeat "$REPEAT" \
    --json docs/bench/lossy.json --plot docs/img/bench-lossy.png || true
"$PY" -m polyrpc.cli bench \
    --transports tcp,tcp/rpc,quic,quic/rpc,kcp,kcp/rpc,raw-asyncio,raw-aioquic,raw-aiokcp \
    --workloads latency,rate,bulk,stream --seconds "${TARGET_SECONDS:-2}" --repeat "${TARGET_REPEAT:-3}" \
    --json docs/bench/targets.json || true
# kcp against tcp with heavier loss (small calls; the relay makes only the UDP rows lossy)
"$PY" -m polyrpc.cli bench --transports kcp,tcp,quic --workloads latency,rate \
    --loss 5% --delay 20ms --seconds "$SECONDS_PER_POINT" --repeat "$REPEAT" \
    --json docs/bench/lossy5.json || true
# real loss for TCP too: kernel netem on a veth pair, in the soft-RoCE VM (root, qemu); where
# the VM cannot run, the page keeps the netem runs already in docs/bench/
if reason=$(vm/rdma-vm.sh check); then
    for loss in 0 1 5; do
        POLYRPC_VM_OUT=docs/bench vm/rdma-vm.sh bench-impaired --transports tcp,quic,kcp \
            --workloads latency,rate,bulk --loss "$loss%" --delay 20ms --jitter 5ms \
            --rate 100mbit --seconds "${VM_SECONDS:-2}" --repeat "${VM_REPEAT:-2}" \
            --json "/results/netem-vm-loss$loss.json" || true
    done
else
    echo "netem runs in the VM not redone ($reason)" >&2
fi
netem=()
for run in docs/bench/netem-vm-loss*.json; do
    [ -f "$run" ] && netem+=(--netem "$run")
done
# the rdma section is measured in the soft-RoCE VM by vm/rdma-vm.sh bench (see the file); the
# budgets section by bench/budgets.py and the tests it names (see the file); the instructions
# section by bench/instructions.py, the compression section by bench/compression.py, the
# middleware section by polyrpc bench's +mw rows and bench/instructions.py (see the files)
"$PY" -m polyrpc.bench.report docs/bench/loopback.json docs/bench/lossy.json \
    --targets docs/bench/targets.json --more-lossy docs/bench/lossy5.json "${netem[@]}" \
    --section docs/bench/rdma-vm.md --section docs/bench/budgets.md \
    --section docs/bench/instructions.md --section docs/bench/compression.md \
    --section docs/bench/middleware.md \
    --images img >docs/benchmarks.md
echo "wrote docs/benchmarks.md"
