#!/usr/bin/env bash
# Set up, then run every check CI runs (CI runs exactly this, through .ci/run):
#   static    ruff (lint, format) and mypy
#   host      the unit, conformance, RPC, interop, CLI and property suites on this machine
#   pure      the host suite again with POLYRPC_PURE_PYTHON=1 (the Python references instead
#             of the C accelerators of the message core)
#   sanitize  the C extensions built with ASan+UBSan and the suites that reach them
#             (scripts/sanitize.sh)
#   fuzz      coverage-guided fuzzing of the frame decoders and the KCP engine for a bounded
#             time (scripts/fuzz.sh; FUZZ_SECONDS per fuzzer, default 60)
#   rdma      the RDMA suite with real verbs inside the soft-RoCE VM (vm/rdma-vm.sh) when this
#             host can run it (root, x86_64, apt); in CI (CI=true) a missing VM is a failure.
#             It mostly waits on qemu, so it starts in the background once the static checks
#             pass and runs alongside the host stages; its log is printed at the end.
# Extra arguments go to the host pytest run. Any stage failing fails the run (after the
# others ran); a summary with each pytest summary line and each stage's time comes last.
# POLYRPC_SKIP_VM=1 leaves the VM out: for local runs only, never set in CI.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1

# transports that must be usable here: a missing one fails the run instead of silently
# dropping out of the parametrised suites
export POLYRPC_REQUIRE_TRANSPORTS=${POLYRPC_REQUIRE_TRANSPORTS:-tcp,tls,unix,mem,quic,kcp}
PY=.venv/bin/python
LOGS=build/ci
rm -rf "$LOGS"
mkdir -p "$LOGS"
summary=()
status=0

fail() { # stage, message
    status=1
    summary+=("FAILED  $1: $2")
}

static_checks() {
    $PY -m ruff check polyrpc tests bench || return 1
    $PY -m ruff format --check polyrpc tests bench || return 1
    $PY -m mypy || return 1 # files and options: [tool.mypy] in pyproject.toml
}
static_checks || exit 1

# the VM stage, started now in its own process group (so it can be stopped as a whole)
vm_pid=
vm_log=$LOGS/rdma-vm.log
vm_started=
stop_vm() {
    if [ -n "$vm_pid" ]; then
        kill -TERM -- "-$vm_pid" 2>/dev/null
        wait "$vm_pid" 2>/dev/null
        vm_pid=
    fi
}
trap 'stop_vm; exit 130' INT TERM
trap stop_vm EXIT
if [ "${POLYRPC_SKIP_VM:-}" = 1 ]; then
    vm_note="RDMA suite NOT run: POLYRPC_SKIP_VM=1 (local runs only)"
    [ "${CI:-}" = true ] && fail rdma "POLYRPC_SKIP_VM=1 is not allowed in CI"
elif reason=$(vm/rdma-vm.sh check); then
    vm_started=$(date +%s)
    setsid vm/rdma-vm.sh test >"$vm_log" 2>&1 &
    vm_pid=$!
    vm_note="RDMA suite started in the background (log: $vm_log)"
elif [ "${CI:-}" = true ]; then
    fail rdma "the RDMA suite cannot run here: $reason"
    vm_note="RDMA suite cannot run: $reason"
else
    vm_note="RDMA suite NOT run: $reason. Run it with: sudo vm/rdma-vm.sh test"
fi
echo "$vm_note" >&2

pytest_stage() { # stage name, then pytest's arguments (env assignments via `env` before)
    local stage=$1 start rc line log=$LOGS/$1.log
    shift
    start=$(date +%s)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^=+ .* in [0-9.]+s.* =+$' "$log" | tail -n 1)
    [ -n "$line" ] || line="(no pytest summary line)"
    if [ "$rc" -eq 5 ]; then
        fail "$stage" "pytest collected no tests: that is a failure"
    elif [ "$rc" -ne 0 ]; then
        fail "$stage" "pytest exit status $rc: $line"
        # which tests: the summary is often all a reader of CI's tail gets to see
        while IFS= read -r line; do
            summary+=("          $line")
        done < <(grep -E '^(FAILED|ERROR) ' "$log" | cut -c 1-300 | head -n 20)
    else
        summary+=("ok      $stage ($(($(date +%s) - start)) s): $line")
    fi
}

# the RDMA tests need an RDMA device and the netem bench test kernel netem: they run in the VM
HOST_SUITE=(--ignore=tests/test_rdma_transport.py --ignore=tests/test_bench_netem.py)
pytest_stage host $PY -m pytest "${HOST_SUITE[@]}" "$@"
# the same suite with every C accelerator of the message core replaced by its Python reference
pytest_stage pure env POLYRPC_PURE_PYTHON=1 $PY -m pytest "${HOST_SUITE[@]}" "$@"

start=$(date +%s)
if scripts/sanitize.sh 2>&1 | tee "$LOGS/sanitize.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    line=$(grep -E '^=+ .* in [0-9.]+s.* =+$' "$LOGS/sanitize.log" | tail -n 1)
    summary+=("ok      sanitize ($(($(date +%s) - start)) s): $line")
else
    fail sanitize "scripts/sanitize.sh failed (log: $LOGS/sanitize.log)"
fi

start=$(date +%s)
if scripts/fuzz.sh "${FUZZ_SECONDS:-60}" 2>&1 | tee "$LOGS/fuzz.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    summary+=("ok      fuzz ($(($(date +%s) - start)) s): $(grep -c ': #[0-9]*[[:space:]]*DONE' "$LOGS/fuzz.log") fuzzers, no crash")
else
    fail fuzz "scripts/fuzz.sh failed (log: $LOGS/fuzz.log)"
fi

if [ -n "$vm_pid" ]; then
    echo "waiting for the RDMA suite in the VM (started $(($(date +%s) - vm_started)) s ago)" >&2
    wait "$vm_pid"
    rc=$?
    vm_pid=
    echo "==================== RDMA suite in the VM (vm/rdma-vm.sh test) ===================="
    cat "$vm_log"
    line=$(grep -E '^=+ .* in [0-9.]+s.* =+$|^[0-9]+ (passed|failed).* in [0-9.]+s' "$vm_log" | tail -n 2 | tr '\n' ' ')
    if [ "$rc" -eq 0 ]; then
        summary+=("ok      rdma ($(($(date +%s) - vm_started)) s, in the background): $line")
    else
        fail rdma "vm/rdma-vm.sh test exit status $rc: $line"
    fi
fi

echo "==================== summary ===================="
[ -n "$vm_note" ] && echo "$vm_note"
printf '%s\n' "${summary[@]}"
[ "$status" -eq 0 ] && echo "all stages passed" || echo "FAILED"
exit "$status"
