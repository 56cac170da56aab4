"""Property tests of the frame decoders the way a session drives them (route(), socket-style
reads, bytes, feed) on arbitrary byte streams: frames or ProtocolError and nothing else, and
the C decoder records exactly what the pure-Python reference records (tests/frame_drive.py,
also the coverage-guided fuzzer's harness: tests/fuzz/frames_fuzzer.py)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrpc.wire.frames import ACCELERATED, HEADER_SIZE, PYTHON, Kind, Limits
from tests.frame_drive import MODES, drive

needs_c = pytest.mark.skipif(not ACCELERATED, reason="C extension not built")

frame_bytes = st.builds(
    lambda kind, seq, method, meta, payload, codec, flags: b"".join(
        bytes(b)
        for b in PYTHON.encode_frame(
            kind, seq, payload, method=method, metadata=meta, codec=codec, flags=flags
        )
    ),
    st.sampled_from(list(Kind)),
    st.integers(0, 12) | st.integers(0, 2**64 - 1),
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=3),
    st.binary(max_size=400),
    st.integers(0, 2),
    st.integers(0, 255),
)
# frames, frames with garbage spliced in, or arbitrary bytes
streams = st.one_of(
    st.lists(frame_bytes, min_size=1, max_size=6).map(b"".join),
    st.tuples(
        st.lists(frame_bytes, min_size=1, max_size=4).map(b"".join),
        st.integers(0, 4000),
        st.binary(min_size=1, max_size=12),
    ).map(lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) :]),
    st.binary(max_size=600),
)
limits = st.sampled_from(
    [
        Limits(),
        Limits(max_frame=300, max_metadata=40, max_method=8),
        Limits(max_frame=HEADER_SIZE, max_metadata=0, max_method=0),
    ]
)
plans = dict(
    data=streams,
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=5),
    modes=st.lists(st.integers(0, len(MODES) - 1), min_size=1, max_size=3),
    seqs=st.lists(st.integers(0, 12), max_size=4),
    limit=limits,
)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize(
    "impl",
    [pytest.param(PYTHON, id="python"), pytest.param(ACCELERATED, id="c", marks=needs_c)],
)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(**plans)
def test_any_stream_routes_to_frames_or_a_protocol_error(
    impl, loop, data, chunks, modes, seqs, limit
):
    events = drive(impl, data, chunks, modes, seqs, limit, loop)
    kinds = {e[0] for e in events}
    assert kinds <= {"batch", "request", "fed", "error", "raised", "still broken", "end"}
    # a lone request is served with serving_one set, and it is a REQUEST
    assert all(e[2] and e[1][0] == Kind.REQUEST for e in events if e[0] == "request")


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(**plans)
def test_c_and_python_decoders_route_any_stream_identically(loop, data, chunks, modes, seqs, limit):
    expected = drive(PYTHON, data, chunks, modes, seqs, limit, loop)
    assert drive(ACCELERATED, data, chunks, modes, seqs, limit, loop) == expected
