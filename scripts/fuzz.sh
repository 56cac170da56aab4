#!/usr/bin/env bash
# Coverage-guided fuzzing for a bounded time (CI runs it from scripts/test.sh):
#   kcp_input_fuzzer   libFuzzer on the KCP engine (tests/fuzz/kcp_input_fuzzer.c), clang with
#                      AddressSanitizer and UndefinedBehaviorSanitizer
#   frames_fuzzer      atheris on the C and pure-Python frame decoders with their routing side
#                      by side (tests/fuzz/frames_fuzzer.py), the C ones built with AddressSanitizer
# Usage: scripts/fuzz.sh [seconds per fuzzer, default 60]. Fails on any crash, leak, hang or
# C/Python difference and prints the reproducer. Seeds: tests/fuzz/corpus/ (new inputs are
# kept in build/fuzz/corpus/, not committed). Needs clang and libFuzzer: installed with apt
# when running as root where apt exists, else the run stops with a clear message (exit 1;
# FUZZ_OPTIONAL=1 makes that a skip, exit 0, for machines that cannot have them).
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
ROOT=$PWD
BUILD=$ROOT/build/fuzz
PY=$ROOT/.venv/bin/python

missing() {
    if [ "${FUZZ_OPTIONAL:-}" = 1 ]; then
        echo "fuzz: SKIPPED: $1" >&2
        exit 0
    fi
    echo "fuzz: cannot run: $1" >&2
    exit 1
}

have_libfuzzer() { # clang, and libFuzzer where this clang looks for it
    command -v clang >/dev/null || return 1
    [ -e "$(clang -print-file-name=libclang_rt.fuzzer-x86_64.a)" ] ||
        [ -e "$(clang --print-runtime-dir 2>/dev/null)/libclang_rt.fuzzer-x86_64.a" ] ||
        [ -e "$(clang --print-runtime-dir 2>/dev/null)/libclang_rt.fuzzer.a" ]
}

if ! have_libfuzzer; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "fuzz: installing clang and libFuzzer with apt" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq clang >/dev/null || { apt-get update -qq && apt-get install -y -qq clang >/dev/null; }
        major=$(clang -dumpversion 2>/dev/null | cut -d. -f1)
        apt-get install -y -qq "libclang-rt-$major-dev" >/dev/null 2>&1 || true
    fi
    have_libfuzzer || missing "clang with libFuzzer (Debian: apt-get install clang libclang-rt-<version>-dev)"
fi
[ -x "$PY" ] || missing ".venv is missing: run scripts/setup.sh first"
if ! "$PY" -c "import atheris" 2>/dev/null; then
    "$PY" -m pip install --quiet atheris || missing "atheris does not install for $("$PY" -V)"
fi

rm -rf "$BUILD/tree" "$BUILD/artifacts"
mkdir -p "$BUILD/tree" "$BUILD/artifacts" "$BUILD/corpus/kcp" "$BUILD/corpus/frames"

# the KCP engine harness: the engine's C file and the harness in one sanitized binary
clang -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -std=c11 -D_GNU_SOURCE -Ipolyrpc/transports/kcp \
    tests/fuzz/kcp_input_fuzzer.c polyrpc/transports/kcp/kcp_engine.c \
    -o "$BUILD/kcp_input_fuzzer" || exit 1

# the frame decoder: a copy of the package whose codec and routing C extensions are built with
# ASan and libFuzzer's coverage hooks (atheris's preloaded runtime provides both)
cp -r polyrpc "$BUILD/tree/"
find "$BUILD/tree" -name __pycache__ -prune -exec rm -rf {} +
include=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
clang -shared -fPIC -g -O1 -fno-omit-frame-pointer -fsanitize=address,fuzzer-no-link \
    -I"$include" polyrpc/wire/_frames.c -o "$BUILD/tree/polyrpc/wire/_frames$suffix" || exit 1
clang -shared -fPIC -g -O1 -fno-omit-frame-pointer -fsanitize=address,fuzzer-no-link \
    -I"$include" polyrpc/session/_routing.c polyrpc/session/_state.c \
    -o "$BUILD/tree/polyrpc/session/_routing$suffix" || exit 1
atheris_dir=$("$PY" -c "import atheris; print(atheris.path())")

# each fuzzer: -max_total_time bounds the run; a crash writes its input to artifacts/
common=(-max_total_time="$SECONDS_EACH" -timeout=25 -rss_limit_mb=3072
    -artifact_prefix="$BUILD/artifacts/" -print_final_stats=1)
status=0
report() { # name, exit status, log
    if [ "$2" -ne 0 ]; then
        status=1
        echo "fuzz: $1 FAILED (exit $2); the end of its log:" >&2
        tail -n 60 "$3" >&2
        for f in "$BUILD"/artifacts/*; do
            [ -e "$f" ] || continue
            echo "fuzz: reproducer $f (base64: $(base64 -w0 "$f" | head -c 4000))" >&2
        done
        echo "fuzz: rerun one input with: $4 <file>" >&2
    else
        echo "fuzz: $1: $(grep -E '^(#[0-9]+.*DONE|Done )' "$3" | tail -n 2 | tr '\n' ' ')"
    fi
}

log=$BUILD/kcp_input_fuzzer.log
"$BUILD/kcp_input_fuzzer" "${common[@]}" -max_len=16384 \
    "$BUILD/corpus/kcp" tests/fuzz/corpus/kcp >"$log" 2>&1
report kcp_input_fuzzer $? "$log" "$BUILD/kcp_input_fuzzer"

log=$BUILD/frames_fuzzer.log
frames_env=(env LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so"
    ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1
    PYTHONPATH="$BUILD/tree:$ROOT")
"${frames_env[@]}" "$PY" tests/fuzz/frames_fuzzer.py "${common[@]}" -max_len=8192 \
    "$BUILD/corpus/frames" tests/fuzz/corpus/frames >"$log" 2>&1
report frames_fuzzer $? "$log" "${frames_env[*]} $PY tests/fuzz/frames_fuzzer.py"

exit "$status"
