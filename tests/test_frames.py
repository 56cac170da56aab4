"""The frame codec and incremental decoder, sans-IO: bytes in, frames out.

Codec tests run against both implementations: the pure-Python reference and the C
accelerator (polyrpc.wire._frames; build it with ``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrpc import ProtocolError
from polyrpc.session.timeouts import DeadlineWheel
from polyrpc.wire import codecs
from polyrpc.wire import frames as frames_module
from polyrpc.wire.frames import (
    ACCELERATED,
    HEADER,
    HEADER_SIZE,
    INITIAL_BUFFER,
    LARGE_PAYLOAD,
    LARGE_STEP,
    MAGIC,
    MAX_BUFFER,
    PYTHON,
    VERSION,
    Implementation,
    Kind,
    Limits,
)

NOT_BUILT = "C extension not built: run python setup.py build_ext --inplace"
both = pytest.mark.parametrize(
    "impl",
    [
        pytest.param(PYTHON, id="python"),
        pytest.param(
            ACCELERATED, id="c", marks=pytest.mark.skipif(not ACCELERATED, reason=NOT_BUILT)
        ),
    ],
)
needs_c = pytest.mark.skipif(not ACCELERATED, reason=NOT_BUILT)

frames_strategy = st.lists(
    st.builds(
        PYTHON.Frame,
        kind=st.sampled_from(list(Kind)),
        seq=st.integers(0, 2**64 - 1),
        method=st.text(max_size=40),
        metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=4),
        payload=st.one_of(st.binary(max_size=3000), st.just(bytes(LARGE_PAYLOAD + 17))),
        codec=st.integers(0, 2),
        flags=st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


def wire(frames: list, impl: Implementation = PYTHON) -> bytes:
    out = b""
    for f in frames:
        out += b"".join(
            bytes(b)
            for b in impl.encode_frame(
                f.kind,
                f.seq,
                f.payload,
                method=f.method,
                metadata=f.metadata,
                codec=f.codec,
                flags=f.flags,
            )
        )
    return out


def normalise(frames: list) -> list[tuple]:
    return [
        (f.kind, f.seq, f.method, dict(f.metadata), bytes(f.payload), f.codec, f.flags)
        for f in frames
    ]


@both
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_decodes_identically(impl, frames, cuts):
    data = wire(frames, impl)
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = impl.FrameDecoder()
    got: list = []
    last = 0
    for point in [*points, len(data)]:
        got += decoder.feed(data[last:point])
        last = point
    assert normalise(got) == normalise(frames)
    assert decoder.pending_bytes == 0


@both
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    frames=frames_strategy,
    position=st.integers(0, 10**6),
    replacement=st.binary(min_size=1, max_size=8),
    chunk=st.integers(1, 5000),
)
def test_corruption_never_crashes_or_allocates_hugely(impl, frames, position, replacement, chunk):
    data = bytearray(wire(frames))
    pos = position % len(data)
    data[pos : pos + len(replacement)] = replacement
    limits = Limits(max_frame=1 << 20)
    decoder = impl.FrameDecoder(limits)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(bytes(data[i : i + chunk]))
            # never holds more than one frame's worth beyond what it was given
            assert len(decoder._buf) <= max(len(data), 256 << 10) + limits.max_frame
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decoder.feed(b"more")  # a broken decoder stays broken


@both
@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4000))
def test_random_bytes_end_in_protocol_error_or_wait(impl, data):
    decoder = impl.FrameDecoder(Limits(max_frame=1 << 20))
    try:
        frames = decoder.feed(data)
    except ProtocolError:
        return
    assert isinstance(frames, list)


@both
@pytest.mark.parametrize(
    ("header_fields", "message"),
    [
        ((b"XX", VERSION, Kind.REQUEST, 0, 0, 0, 1, 0, 0), "not speaking polyrpc"),
        ((MAGIC, 9, Kind.REQUEST, 0, 0, 0, 1, 0, 0), "unsupported polyrpc frame version 9"),
        ((MAGIC, VERSION, 99, 0, 0, 0, 1, 0, 0), "unknown frame kind 99"),
        ((MAGIC, VERSION, Kind.REQUEST, 0, 0, 5000, 1, 0, 0), "method name of 5000 bytes"),
        ((MAGIC, VERSION, Kind.REQUEST, 0, 0, 0, 1, 1 << 20, 0), "metadata of 1048576 bytes"),
        ((MAGIC, VERSION, Kind.REQUEST, 0, 0, 0, 1, 0, 0xFFFFFFFF), "exceeds the limit"),
    ],
)
def test_header_limits_checked_before_allocation(impl, header_fields, message):
    decoder = impl.FrameDecoder()
    before = len(decoder._buf)
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(HEADER.pack(*header_fields))
    assert len(decoder._buf) == before


@both
def test_http_and_tls_peers_are_named(impl):
    with pytest.raises(ProtocolError, match="speaking HTTP"):
        impl.FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="speaking TLS"):
        impl.FrameDecoder().feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))


@both
def test_malformed_metadata_is_a_protocol_error(impl):
    bad_meta = struct.pack("<H", 3) + b"key" + struct.pack("<I", 1000) + b"short"
    header = HEADER.pack(MAGIC, VERSION, Kind.ONEWAY, 0, 0, 0, 1, len(bad_meta), 0)
    with pytest.raises(ProtocolError, match="metadata"):
        impl.FrameDecoder().feed(header + bad_meta)


@both
def test_large_payload_is_read_into_its_own_buffer(impl):
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = b"".join(bytes(b) for b in impl.encode_frame(Kind.ONEWAY, 3, payload))
    decoder = impl.FrameDecoder()
    frames = []
    pos = 0
    while pos < len(data):
        view = decoder.get_buffer(65536)
        n = min(len(view), len(data) - pos, 65536)
        view[:n] = data[pos : pos + n]
        pos += n
        frames += decoder.buffer_updated(n)
    assert len(frames) == 1 and frames[0].payload == payload
    assert len(decoder._buf) < len(payload)  # not staged through the small-frame buffer


@both
def test_encoder_keeps_large_payloads_separate_for_gather_writes(impl):
    payload = bytes(LARGE_PAYLOAD)
    buffers = impl.encode_frame(Kind.REQUEST, 1, payload, method="A.b")
    assert len(buffers) == 2 and buffers[1] is payload
    assert len(buffers[0]) == HEADER_SIZE + 3
    assert len(impl.encode_frame(Kind.REQUEST, 1, b"small")) == 1
    plain = impl.encode_plain(Kind.RESPONSE, 2, payload)
    assert len(plain) == 2 and plain[1] is payload and len(plain[0]) == HEADER_SIZE


@both
def test_large_frame_with_split_prefix_while_the_read_view_is_alive(impl):
    """asyncio's selector loop keeps get_buffer's view alive during buffer_updated."""
    data = b"".join(bytes(b) for b in impl.encode_frame(2, 1, bytes(1 << 20), method="Svc.put"))
    decoder = impl.FrameDecoder()
    got, pos = [], 0
    for size in (30, 1000, len(data)):  # the first read ends inside the method name
        view = decoder.get_buffer(-1)
        n = min(len(view), len(data) - pos, size)
        view[:n] = data[pos : pos + n]
        pos += n
        got += decoder.buffer_updated(n)
        del view
    while pos < len(data):
        view = decoder.get_buffer(-1)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        got += decoder.buffer_updated(n)
        del view
    assert normalise(got) == [(2, 1, "Svc.put", {}, bytes(1 << 20), 0, 0)]
    # the payload never went through the small buffer: it holds at most one read and the prefix
    assert len(decoder._buf) <= INITIAL_BUFFER + HEADER_SIZE + len("Svc.put")


@both
def test_method_names_are_cached_and_limits_can_be_replaced(impl):
    data = wire([PYTHON.Frame(Kind.REQUEST, 1, "Svc.m"), PYTHON.Frame(Kind.REQUEST, 3, "Svc.m")])
    decoder = impl.FrameDecoder()
    first, second = decoder.feed(data)
    assert first.method == "Svc.m" and first.method is second.method
    decoder.limits = Limits(max_method=2)
    assert decoder.limits == Limits(max_method=2)
    with pytest.raises(ProtocolError, match="method name of 5 bytes exceeds 2"):
        decoder.feed(data)
    assert isinstance(decoder.broken, ProtocolError)


@both
def test_invalid_method_name_breaks_the_decoder(impl):
    header = HEADER.pack(MAGIC, VERSION, Kind.REQUEST, 0, 0, 2, 1, 0, 0)
    decoder = impl.FrameDecoder()
    with pytest.raises(ProtocolError, match="method name is not valid UTF-8"):
        decoder.feed(header + b"\xff\xfe")
    assert decoder.pending_bytes == HEADER_SIZE + 2


# -- budgets: handshake limit, buffers that grow with the data ----------------------


def socket_reads(decoder, data: bytes, size: int) -> list:
    """Feed ``data`` the way asyncio does: get_buffer, fill up to ``size``, buffer_updated."""
    got, pos = [], 0
    while pos < len(data):
        view = decoder.get_buffer(-1)
        n = min(len(view), size, len(data) - pos)
        view[:n] = data[pos : pos + n]
        got += decoder.buffer_updated(n)
        del view
        pos += n
    return got


def hello_then(frame_size: int) -> tuple[bytes, bytes]:
    hello = wire([PYTHON.Frame(Kind.HELLO, 0, metadata={"version": "1"})])
    big = wire([PYTHON.Frame(Kind.REQUEST, 1, "Svc.m", payload=bytes(frame_size))])
    return hello, big


@both
def test_handshake_mode_refuses_big_frames_naming_size_and_limit(impl):
    decoder = impl.FrameDecoder(Limits(), handshake=True)
    assert decoder.max_frame == 16 << 10
    header = HEADER.pack(MAGIC, VERSION, Kind.HELLO, 0, 0, 0, 0, 0, (64 << 20) - 64)
    with pytest.raises(
        ProtocolError,
        match=r"frame of 67108824 bytes exceeds the limit of 16384 before the handshake",
    ):
        decoder.feed(header)
    assert len(decoder._buf) == INITIAL_BUFFER
    # a handshake limit of its own; frames up to it are fine
    limits = Limits(max_handshake_frame=1000)
    decoder = impl.FrameDecoder(limits, handshake=True)
    assert decoder.feed(wire([PYTHON.Frame(Kind.HELLO, 0, payload=bytes(976))]))[0].kind == 1
    with pytest.raises(ProtocolError, match="frame of 1001 bytes exceeds the limit of 1000"):
        impl.FrameDecoder(limits, handshake=True).feed(
            wire([PYTHON.Frame(Kind.HELLO, 0, payload=bytes(977))])
        )
    # without handshake mode the frame limit is max_frame, as before; never more in it
    assert impl.FrameDecoder(limits).max_frame == 64 << 20
    assert impl.FrameDecoder(Limits(max_frame=1000), handshake=True).max_frame == 1000


@both
@pytest.mark.parametrize("read_size", [1 << 30, 1000])
def test_a_hello_bigger_than_the_initial_buffer_decodes_in_handshake_mode(impl, read_size):
    """A HELLO may use all of max_handshake_frame (16 KiB): the buffer grows to fit it."""
    limit = Limits().max_handshake_frame
    overhead = len(wire([PYTHON.Frame(Kind.HELLO, 0, metadata={"key": ""})]))
    metadata = {"key": "v" * (limit - overhead)}  # the frame is max_handshake_frame exactly
    hello = wire([PYTHON.Frame(Kind.HELLO, 0, metadata=metadata)])
    assert len(hello) == limit > INITIAL_BUFFER
    decoder = impl.FrameDecoder(Limits(), handshake=True)
    got = socket_reads(decoder, hello, read_size)
    assert normalise(got) == [(1, 0, "", metadata, b"", 0, 0)]
    assert decoder.pending_bytes == 0


@both
def test_set_max_frame_lifts_the_handshake_limit_and_a_batch_ends_at_hello(impl):
    hello, big = hello_then(100_000)
    decoder = impl.FrameDecoder(Limits(), handshake=True)
    first = decoder.feed(hello + big)  # one read: the HELLO is decoded, the rest waits
    assert [f.kind for f in first] == [Kind.HELLO]
    assert decoder.pending_bytes == len(big)
    decoder.set_max_frame(1 << 20)
    assert decoder.max_frame == 1 << 20
    rest = decoder.buffer_updated(0)  # what the session does after the handshake
    assert normalise(rest) == [(2, 1, "Svc.m", {}, bytes(100_000), 0, 0)]
    with pytest.raises(
        ProtocolError, match=r"frame of 2097176 bytes exceeds the limit of 1048576$"
    ):
        decoder.feed(HEADER.pack(MAGIC, VERSION, 2, 0, 0, 0, 3, 0, 2 << 20))
    with pytest.raises(ValueError, match="max_frame must be at least 24"):
        impl.FrameDecoder().set_max_frame(3)


@both
def test_a_header_alone_allocates_little_whatever_size_it_announces(impl):
    decoder = impl.FrameDecoder()
    decoder.feed(HEADER.pack(MAGIC, VERSION, Kind.ONEWAY, 0, 0, 0, 1, 0, (64 << 20) - 64))
    decoder.feed(b"x")
    view = decoder.get_buffer(-1)
    assert len(view) < LARGE_STEP  # the payload buffer holds what arrived plus one step
    del view
    # it grows as the data arrives, at most doubling what was received
    payload = os.urandom(3 << 20)
    decoder = impl.FrameDecoder()
    data = wire([PYTHON.Frame(Kind.ONEWAY, 1, payload=payload)])
    pos = 0
    while pos < len(data):
        view = decoder.get_buffer(-1)
        assert pos + len(view) <= max(2 * pos, LARGE_STEP) + HEADER_SIZE
        n = min(len(view), 100_000, len(data) - pos)
        view[:n] = data[pos : pos + n]
        del view
        got = decoder.buffer_updated(n)
        pos += n
    assert len(got) == 1 and got[0].payload == payload


@both
def test_the_read_buffer_starts_small_grows_with_full_reads_and_trims_when_idle(impl):
    decoder = impl.FrameDecoder()
    assert len(decoder._buf) == INITIAL_BUFFER
    many = wire([PYTHON.Frame(Kind.ONEWAY, i, payload=bytes(100)) for i in range(3000)])
    got = socket_reads(decoder, many, 1 << 30)  # every read fills what it is offered
    assert len(got) == 3000
    assert len(decoder._buf) == MAX_BUFFER  # doubled read by read, up to the cap
    decoder.trim()
    assert len(decoder._buf) == INITIAL_BUFFER
    assert len(socket_reads(decoder, many[:5000], 1 << 30)) == 5000 // 124
    small = impl.FrameDecoder()
    socket_reads(small, many, 1000)  # small reads never fill it: it never doubles, holding
    assert len(small._buf) < INITIAL_BUFFER + 124  # at most one read and a partial frame
    # trim keeps a pending partial frame
    partial = impl.FrameDecoder()
    socket_reads(partial, many[: 1 << 17], 1 << 30)
    held = partial.pending_bytes
    assert held and len(partial._buf) > INITIAL_BUFFER
    partial.trim()
    assert partial.pending_bytes == held
    # handshake mode never grows the buffer for reads
    shaking = impl.FrameDecoder(handshake=True)
    socket_reads(shaking, many[: 100 * 124], 1 << 30)
    assert len(shaking._buf) < INITIAL_BUFFER + 124


@both
def test_get_buffer_grows_while_an_earlier_view_is_still_alive(impl):
    """The kcp transport holds the last view while it asks for the next one."""
    data = wire(
        [
            PYTHON.Frame(Kind.ONEWAY, i, payload=bytes(n))
            for i, n in enumerate([100, 60_000, 200_000, 100] * 3)
        ]
    )
    decoder = impl.FrameDecoder()
    got, pos, views = [], 0, []
    while pos < len(data):
        view = decoder.get_buffer(-1)
        views.append(view)  # never released until the end
        n = min(len(view), 50_000, len(data) - pos)
        view[:n] = data[pos : pos + n]
        got += decoder.buffer_updated(n)
        pos += n
    assert [len(f.payload) for f in got] == [100, 60_000, 200_000, 100] * 3
    assert len(decoder._buf) <= MAX_BUFFER


@needs_c
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=4),
    chunks=st.lists(st.integers(1, 70000), min_size=1, max_size=8),
    zero_copy=st.lists(st.booleans(), min_size=1, max_size=4),
    handshake_limit=st.integers(HEADER_SIZE, 200_000),
)
def test_implementations_agree_in_handshake_mode(sizes, chunks, zero_copy, handshake_limit):
    frames = [PYTHON.Frame(Kind.HELLO, 0, payload=bytes(sizes[0] % 20_000))]
    frames += [
        PYTHON.Frame(Kind.REQUEST, 2 * i + 1, "S.m", payload=bytes(n))
        for i, n in enumerate(sizes[1:])
    ]
    data = wire(frames)
    limits = Limits(max_handshake_frame=handshake_limit)
    results = []
    for impl in (PYTHON, ACCELERATED):
        decoder = impl.FrameDecoder(limits, handshake=True)
        events = run_decoder(decoder, data, chunks, zero_copy)
        if not isinstance(events[-1][0], str):
            decoder.set_max_frame(1 << 20)
            events.append(normalise(decoder.buffer_updated(0)))
            decoder.trim()
            events.append((decoder.pending_bytes, len(decoder._buf), decoder.max_frame))
        results.append(events)
    assert results[0] == results[1]


# -- the C accelerator against the Python reference ---------------------------------

payload_types = st.sampled_from([bytes, bytearray, memoryview])


@needs_c
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(frames=frames_strategy, wrap=payload_types)
def test_implementations_encode_byte_identically(frames, wrap):
    for f in frames:
        payload = wrap(f.payload)
        results = []
        for impl in (PYTHON, ACCELERATED):
            full = impl.encode_frame(
                f.kind,
                f.seq,
                payload,
                method=f.method,
                metadata=f.metadata,
                codec=f.codec,
                flags=f.flags,
            )
            plain = impl.encode_plain(f.kind, f.seq, payload, f.codec, f.flags)
            results.append(
                [
                    (type(b), bytes(b), b is payload)
                    if isinstance(b, memoryview)
                    else (type(b), b, b is payload)
                    for b in (*full, None, *plain)
                    if b is not None
                ]
            )
        assert results[0] == results[1]


limits_strategy = st.builds(
    Limits,
    max_frame=st.integers(HEADER_SIZE, 1 << 21),
    max_metadata=st.integers(0, 300),
    max_method=st.integers(0, 60),
)


def run_decoder(decoder, data: bytes, chunks: list[int], zero_copy: list[bool]) -> list:
    """Feed ``data`` in ``chunks``; one event per chunk: frames or the error, and the state.

    Stops at the first error (a broken decoder's connection is closed), after checking that
    the decoder stays broken.
    """
    events: list = []
    pos, i = 0, 0
    while pos < len(data):
        size = chunks[i % len(chunks)]
        use_view = zero_copy[i % len(zero_copy)]
        i += 1
        try:
            if use_view:
                view = decoder.get_buffer(-1)  # kept alive across buffer_updated, as asyncio does
                n = min(len(view), size, len(data) - pos)
                view[:n] = data[pos : pos + n]
                got = decoder.buffer_updated(n)
                del view
            else:
                n = min(size, len(data) - pos)
                got = decoder.feed(data[pos : pos + n])
        except ProtocolError as exc:
            with pytest.raises(ProtocolError) as again:
                decoder.feed(b"more")
            events.append((str(exc), str(again.value), str(decoder.broken), decoder.pending_bytes))
            break
        pos += n
        frames = [
            (*t, type(f.payload), type(f.metadata))
            for t, f in zip(normalise(got), got, strict=True)
        ]
        events.append((frames, decoder.pending_bytes, len(decoder._buf)))
    return events


@needs_c
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    frames=frames_strategy,
    limits=limits_strategy,
    corrupt=st.none() | st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    chunks=st.lists(st.integers(1, 70000), min_size=1, max_size=8),
    zero_copy=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_implementations_decode_identically(frames, limits, corrupt, chunks, zero_copy):
    data = bytearray(wire(frames))
    if corrupt is not None:
        pos = corrupt[0] % len(data)
        data[pos : pos + len(corrupt[1])] = corrupt[1]
    expected = run_decoder(PYTHON.FrameDecoder(limits), bytes(data), chunks, zero_copy)
    assert run_decoder(ACCELERATED.FrameDecoder(limits), bytes(data), chunks, zero_copy) == expected


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    meta=st.binary(max_size=60),
    method=st.binary(max_size=8),
    payload=st.binary(max_size=8),
)
def test_implementations_agree_on_arbitrary_method_and_metadata_bytes(meta, method, payload):
    header = HEADER.pack(MAGIC, VERSION, Kind.ONEWAY, 0, 0, len(method), 9, len(meta), len(payload))
    data = header + method + meta + payload
    assert run_decoder(ACCELERATED.FrameDecoder(), data, [len(data)], [False]) == run_decoder(
        PYTHON.FrameDecoder(), data, [len(data)], [False]
    )


def outcome(fn, *args, **kwargs):
    try:
        return ("ok", [bytes(b) for b in fn(*args, **kwargs)])
    except Exception as exc:
        return (type(exc), str(exc))


class Sized:
    """A payload whose len() is not its byte count (len(payload) goes into the header)."""

    def __len__(self) -> int:
        return 3


@needs_c
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((256, 1, b"x"), {}),
        ((-1, 1, b"x"), {}),
        ((2, -1, b"x"), {}),
        ((2, 1 << 64, b"x"), {}),
        ((2.0, 1, b"x"), {}),
        ((Kind.REQUEST, True, b"x"), {}),
        ((2, 1, "text"), {}),
        ((2, 1, Sized()), {}),
        ((2, 1, memoryview(b"abcdefgh").cast("I")), {}),
        ((2, 1, b"x"), {"codec": 300}),
        ((2, 1, b"x"), {"flags": -1}),
        ((2, 1, b"x"), {"method": b"bytes"}),
        ((2, 1, b"x"), {"method": "\ud800"}),
        ((2, 1, b"x"), {"method": "m" * 70000}),
        ((2, 1, b"x"), {"metadata": {"k": 1}}),
        ((2, 1, b"x"), {"metadata": {1: "v"}}),
        ((2, 1, b"x"), {"metadata": {"k" * 70000: "v"}}),
        ((2, 1, b"x"), {"metadata": {"k": "\udcff"}}),
        ((2, 1, b"x"), {"metadata": [("k", "v")]}),
        ((2, 1, b"x"), {"method": "", "metadata": {}}),
        ((2, 1, b"x"), {"unknown": 1}),
        ((2, 1, b"x", 0), {}),
        ((2,), {}),
        ((2, 1), {"payload": b"kw"}),
        ((2, 1, bytearray(b"\xe9t\xe9")), {"method": "caf\xe9", "metadata": {"\u00fc": "\u20ac"}}),
    ],
)
def test_implementations_agree_on_unusual_encoder_arguments(args, kwargs):
    assert outcome(ACCELERATED.encode_frame, *args, **kwargs) == outcome(
        PYTHON.encode_frame, *args, **kwargs
    )
    plain_args = args + tuple(kwargs[k] for k in ("codec", "flags") if k in kwargs)
    if len(kwargs) == len(plain_args) - len(args):
        assert outcome(ACCELERATED.encode_plain, *plain_args) == outcome(
            PYTHON.encode_plain, *plain_args
        )
    assert outcome(ACCELERATED.encode_plain, 2, 1, b"x", flags=4) == outcome(
        PYTHON.encode_plain, 2, 1, b"x", flags=4
    )


@needs_c
def test_c_frame_behaves_like_the_python_frame():
    c_frame, py_frame = ACCELERATED.Frame, PYTHON.Frame
    args = (Kind.REQUEST, 7, "A.b", {"k": "v"}, b"abc", 1, 3)
    a, b = c_frame(*args), py_frame(*args)
    assert repr(a) == repr(b)
    assert repr(c_frame(99, 1)) == repr(py_frame(99, 1))
    for name in ("kind", "seq", "method", "metadata", "payload", "codec", "flags"):
        assert getattr(a, name) == getattr(b, name)
    d = c_frame(kind=2, seq=1)
    assert (d.method, d.metadata, d.payload, d.codec, d.flags) == ("", {}, b"", 0, 0)
    assert a == c_frame(*args)
    assert not a != c_frame(*args)  # noqa: SIM202
    a.payload = bytearray(b"new")  # the decoder sets large payloads after the fact
    assert a.payload == b"new" and a != c_frame(*args)
    with pytest.raises(TypeError):
        hash(a)
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(AttributeError):
        a.other = 1
    with pytest.raises(TypeError):
        c_frame(1)


@needs_c
def test_c_module_constants_match_the_protocol():
    from polyrpc.wire import _frames

    assert _frames.HEADER_SIZE == HEADER_SIZE == HEADER.size
    assert _frames.VERSION == VERSION
    assert _frames.LARGE_PAYLOAD == LARGE_PAYLOAD
    assert _frames.INITIAL_BUFFER == INITIAL_BUFFER
    assert _frames.MAX_BUFFER == MAX_BUFFER
    assert _frames.LARGE_STEP == LARGE_STEP
    assert [min(Kind), max(Kind)] == [_frames.KIND_MIN, _frames.KIND_MAX]
    assert sorted(int(k) for k in Kind) == list(range(min(Kind), max(Kind) + 1))


@needs_c
@pytest.mark.parametrize("read", ["get_buffer", "feed"])
def test_c_decoder_reads_a_large_payload_into_the_bytes_it_hands_out(read):
    """No second copy: the big payload arrives as ``bytes``, filled in place, and the
    writable view of it offered to readers covers only (part of) what is not yet filled."""
    payload = os.urandom(3 * LARGE_PAYLOAD)
    data = b"".join(bytes(b) for b in ACCELERATED.encode_frame(Kind.REQUEST, 9, payload))
    decoder = ACCELERATED.FrameDecoder()
    got, pos = [], 0
    while pos < len(data):
        n = min(50_000, len(data) - pos)
        if read == "feed":
            got += decoder.feed(data[pos : pos + n])
        else:
            view = decoder.get_buffer(-1)
            assert not view.readonly
            assert len(view) <= len(data) - pos  # never past the payload's unfilled tail
            n = min(n, len(view))
            view[:n] = data[pos : pos + n]
            del view
            got += decoder.buffer_updated(n)
        pos += n
    assert len(got) == 1 and type(got[0].payload) is bytes and got[0].payload == payload
    assert hash(got[0].payload) == hash(payload)


@needs_c
def test_c_decoder_rejects_an_overrun_of_its_buffer():
    decoder = ACCELERATED.FrameDecoder()
    room = len(decoder.get_buffer(-1))
    with pytest.raises(ValueError, match="get_buffer"):
        decoder.buffer_updated(room + 1)
    with pytest.raises(ValueError, match="get_buffer"):
        decoder.buffer_updated(-1)
    assert decoder.pending_bytes == 0 and decoder.feed(b"") == []


@pytest.mark.parametrize("pure", ["1", ""])
def test_pure_python_env_var_selects_the_implementation(pure):
    code = "from polyrpc.wire import frames as f; print(f.IMPLEMENTATION.name, f.FrameDecoder.__module__)"
    env = {**os.environ, "POLYRPC_PURE_PYTHON": pure}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if pure or not ACCELERATED:
        assert out == ["python", "polyrpc.wire.frames"]
    else:
        assert out == ["c", "polyrpc.wire._frames"]
    assert (frames_module.FrameDecoder is PYTHON.FrameDecoder) == (
        frames_module.IMPLEMENTATION is PYTHON
    )


@pytest.mark.parametrize("name", ["msgpack", "json", "raw"])
def test_codecs_round_trip(name):
    codec = codecs.codec_by_name(name)
    value = b"\x00\x01bytes" if name == "raw" else {"a": [1, 2.5, "x", None, True]}
    assert codec.decode(codec.encode(value)) == value


def test_codec_errors_are_clear():
    with pytest.raises(TypeError, match="cannot encode object with msgpack"):
        codecs.codec_by_name("msgpack").encode(object())
    with pytest.raises(ValueError, match="unknown codec 'yaml'; available: json, msgpack, raw"):
        codecs.codec_by_name("yaml")
    with pytest.raises(ProtocolError, match="unknown codec id 77"):
        codecs.codec_by_id(77)
    with pytest.raises(ProtocolError, match="undecodable JSON"):
        codecs.codec_by_name("json").decode(b"{nope")


HOSTILE = {
    "msgpack-empty-maps": ("msgpack", msgpack.packb([{}] * (1 << 20))),
    "msgpack-tiny-maps": ("msgpack", msgpack.packb([{0: 0}] * (1 << 18))),
    "msgpack-empty-arrays": ("msgpack", msgpack.packb([[]] * (1 << 20))),
    "msgpack-singletons": ("msgpack", msgpack.packb([[0]] * (1 << 19))),
    "msgpack-map16-of-maps": ("msgpack", b"\xde\xff\xff" + b"\x00\x80" * 65535),
    "msgpack-deep": ("msgpack", b"\x91" * 2000 + b"\xc0"),
    "json-empty-arrays": ("json", json.dumps([[]] * (1 << 18), separators=(",", ":")).encode()),
    "json-empty-maps": ("json", json.dumps([{}] * (1 << 18), separators=(",", ":")).encode()),
    "json-tiny-maps": ("json", json.dumps([{"a": 1}] * (1 << 17), separators=(",", ":")).encode()),
    "json-deep": ("json", b"[" * 100_000),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_decoding_cannot_amplify(impl, case):
    """A payload that would decode to far more memory than its size fails by itself, with
    a clear error, before it is decoded: it allocates about its own size at most."""
    name, payload = HOSTILE[case]
    codec = codecs.codec_by_name(name)
    tracemalloc.start()
    try:
        with pytest.raises(codecs.PayloadTooComplex, match="payload of .* bytes"):
            codec.decode(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(payload) + (1 << 20)
    assert isinstance(codecs.PayloadTooComplex("x"), ProtocolError)
    _, unchecked = codec.unchecked
    with pytest.raises(codecs.PayloadTooComplex):
        unchecked(payload)  # the hot paths (and the C EagerServer) decode through it too


@pytest.mark.parametrize(
    "value",
    [
        [[1, 2]] * 100_000,  # pairs: 3 bytes each
        [{"id": i, "name": "bob"} for i in range(20_000)],
        ["ab"] * 100_000,
        list(range(100_000)),
        {str(i): [i, i] for i in range(20_000)},
        [{"id": i, "ok": True, "tags": ["a", "b"], "score": i / 7} for i in range(10_000)],
        [[], {}, "x" * 40] * 10_000,  # empty containers among bigger values
        b"x" * (1 << 20),
        "x" * (1 << 20),
    ],
    ids=["pairs", "records", "strings", "ints", "map-of-lists", "rows", "mixed", "bytes", "str"],
)
def test_bounded_decoding_accepts_dense_ordinary_payloads(impl, value):
    for name in ("msgpack", "json"):
        if name == "json" and isinstance(value, bytes):
            continue
        codec = codecs.codec_by_name(name)
        assert codec.decode(codec.encode(value)) == (
            value if name == "msgpack" else json.loads(json.dumps(value))
        )


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=5), inner, max_size=20),
    max_leaves=60,
)  # fmt: skip


@needs_c
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=msgpack_values, cut=st.integers(0, 10_000), noise=st.binary(max_size=64))
def test_c_and_python_scans_count_alike(value, cut, noise):
    """The C scans are a stand-in for the Python ones: same counts on valid, cut short and
    random payloads, for both codecs."""
    from polyrpc.wire import _frames

    packed = msgpack.packb(value)
    as_json = json.dumps(value, default=repr).encode()
    for data in (packed, packed[:cut], noise, packed[:cut] + noise):
        assert _frames.msgpack_counts(data) == codecs.msgpack_counts(data)
    for data in (as_json, as_json[:cut], noise, as_json[:cut] + noise):
        assert _frames.json_counts(data) == codecs.json_counts(data)
    assert codecs.msgpack_counts(packed) == _containers(value)


def _containers(value) -> tuple[int, int, int, int, int]:
    """(arrays, elements, maps, non-empty maps, entries) in ``value``, counted on the objects."""
    counts = [0] * 5
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, list):
            counts[0], counts[1] = counts[0] + 1, counts[1] + len(item)
            todo.extend(item)
        elif isinstance(item, dict):
            counts[2], counts[3], counts[4] = (
                counts[2] + 1,
                counts[3] + bool(item),
                counts[4] + len(item),
            )
            todo.extend(item.values())
    return tuple(counts)


def test_deadline_wheel_batches_and_expires_in_order():
    wheel = DeadlineWheel(granularity=0.01)
    assert wheel.add(1, 1.001) is True
    assert wheel.add(2, 1.004) is False  # same 10 ms bucket: no new timer
    assert wheel.add(3, 0.5) is True  # earlier bucket: re-arm
    assert wheel.add(4, 2.0) is False
    assert wheel.next_deadline() == pytest.approx(0.5)
    assert wheel.expire(0.4) == []
    assert wheel.expire(1.02) == [3, 1, 2]
    assert wheel.expire(5) == [4]
    assert wheel.next_deadline() is None
