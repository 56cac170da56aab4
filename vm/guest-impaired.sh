#!/bin/sh
# Runs inside the VM: `polyrpc bench --impair-with netem`, netem on a veth pair so that TCP sees
# the real loss as well as UDP. Without arguments: tcp, quic and kcp with their /rpc rows at
# loss 1%, delay 20 ms ± 5 ms, rate 100 Mbit/s each way; with arguments, those are the bench's.
# Writes /results/impaired.json unless the arguments name another --json.
export PY_COLORS=0
[ $# -gt 0 ] || set -- --transports tcp,tcp/rpc,quic,quic/rpc,kcp,kcp/rpc \
    --workloads latency,rate --loss 1% --delay 20ms --jitter 5ms --rate 100mbit
case " $* " in
*" --json "*) ;;
*) set -- "$@" --json /results/impaired.json ;;
esac
# (through a file: not a terminal, so no progress animation on the serial console)
python3 -m polyrpc.cli bench --impair-with netem "$@" >/tmp/bench.out 2>&1
rc=$?
cat /tmp/bench.out
exit $rc
