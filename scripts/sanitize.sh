#!/usr/bin/env bash
# The C extensions (the frame codec polyrpc/wire/_frames.c, the session's routing decoder
# polyrpc/session/_routing.c, the RPC call server polyrpc/rpc/_callserver.c and the KCP
# core's cffi module) built with AddressSanitizer and UndefinedBehaviorSanitizer into a copy
# of the checkout (build/sanitize/tree: the checkout's own builds stay as they are), then
# the suites that reach them run against that build: conformance, frames, routing, eager
# call server, KCP engine and transport, the property tests, and tests/adversarial when it
# exists. Any sanitizer report fails the run. Extra arguments replace the list of tests. CI
# runs it from scripts/test.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TREE=$ROOT/build/sanitize/tree
[ -x "$PY" ] || { echo "sanitize: .venv is missing: run scripts/setup.sh first" >&2; exit 1; }
libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
if [ ! -e "$libasan" ] || [ ! -e "$libubsan" ]; then
    echo "sanitize: gcc's libasan/libubsan are missing (Debian: apt-get install gcc)" >&2
    exit 1
fi

rm -rf "$ROOT/build/sanitize"
mkdir -p "$TREE"
tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./vm/cache \
    --exclude='*.so' --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache . |
    tar -x -C "$TREE" || exit 1
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
(cd "$TREE" && CC=gcc CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    "$PY" setup.py -q build_ext --inplace --force --build-temp "$ROOT/build/sanitize/tmp" \
    >"$ROOT/build/sanitize/build.log" 2>&1) || {
    cat "$ROOT/build/sanitize/build.log" >&2
    echo "sanitize: building the instrumented extensions failed" >&2
    exit 1
}

if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=(tests/test_conformance.py tests/test_rpc_conformance.py tests/test_frames.py
        tests/test_routing.py tests/test_eager.py tests/test_kcp_engine.py
        tests/test_kcp_transport.py)
    for f in tests/test_*_properties.py; do [ -e "$f" ] && tests+=("$f"); done
    [ -d tests/adversarial ] && tests+=(tests/adversarial)
fi

# python itself is not instrumented: the runtimes are preloaded, leaks (python's own, at
# exit) are not reported; everything else aborts with a report. From the copy, so that
# `import polyrpc` (and every server subprocess the tests start) gets the instrumented build.
cd "$TREE" || exit 1
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH=$TREE
which=$("$PY" -c "from polyrpc.wire import frames, _frames; from polyrpc.session import _routing
from polyrpc.rpc import _callserver; from polyrpc.transports.kcp import _kcp
print(frames.IMPLEMENTATION.name, _frames.__file__, _routing.__file__, _callserver.__file__,
      _kcp.__file__)") || exit 1
case "$which" in
"c $TREE/"*" $TREE/"*" $TREE/"*" $TREE/"*) echo "sanitize: testing the instrumented build: $which" ;;
*) echo "sanitize: the instrumented build is not the one imported: $which" >&2; exit 1 ;;
esac
"$PY" -m pytest -p no:cacheprovider "${tests[@]}"
