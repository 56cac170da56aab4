"""The frame codec and incremental decoder, sans-IO: bytes in, frames out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrpc import ProtocolError
from polyrpc.core import codecs
from polyrpc.core.frames import (
    HEADER,
    HEADER_SIZE,
    LARGE_PAYLOAD,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    encode_frame,
)
from polyrpc.core.timeouts import DeadlineWheel

frames_strategy = st.lists(
    st.builds(
        Frame,
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


def wire(frames: list[Frame]) -> bytes:
    out = b""
    for f in frames:
        out += b"".join(
            bytes(b)
            for b in encode_frame(
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


def normalise(frames: list[Frame]) -> list[tuple]:
    return [
        (f.kind, f.seq, f.method, dict(f.metadata), bytes(f.payload), f.codec, f.flags)
        for f in frames
    ]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_decodes_identically(frames, cuts):
    data = wire(frames)
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = FrameDecoder()
    got: list[Frame] = []
    last = 0
    for point in [*points, len(data)]:
        got += decoder.feed(data[last:point])
        last = point
    assert normalise(got) == normalise(frames)
    assert decoder.pending_bytes == 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    frames=frames_strategy,
    position=st.integers(0, 10**6),
    replacement=st.binary(min_size=1, max_size=8),
    chunk=st.integers(1, 5000),
)
def test_corruption_never_crashes_or_allocates_hugely(frames, position, replacement, chunk):
    data = bytearray(wire(frames))
    pos = position % len(data)
    data[pos : pos + len(replacement)] = replacement
    limits = Limits(max_frame=1 << 20)
    decoder = FrameDecoder(limits)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(bytes(data[i : i + chunk]))
            # never holds more than one frame's worth beyond what it was given
            assert len(decoder._buf) <= max(len(data), 256 << 10) + limits.max_frame
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decoder.feed(b"more")  # a broken decoder stays broken


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4000))
def test_random_bytes_end_in_protocol_error_or_wait(data):
    decoder = FrameDecoder(Limits(max_frame=1 << 20))
    try:
        frames = decoder.feed(data)
    except ProtocolError:
        return
    assert isinstance(frames, list)


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
def test_header_limits_checked_before_allocation(header_fields, message):
    decoder = FrameDecoder()
    before = len(decoder._buf)
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(HEADER.pack(*header_fields))
    assert len(decoder._buf) == before


def test_http_and_tls_peers_are_named():
    with pytest.raises(ProtocolError, match="speaking HTTP"):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="speaking TLS"):
        FrameDecoder().feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))


def test_malformed_metadata_is_a_protocol_error():
    bad_meta = struct.pack("<H", 3) + b"key" + struct.pack("<I", 1000) + b"short"
    header = HEADER.pack(MAGIC, VERSION, Kind.ONEWAY, 0, 0, 0, 1, len(bad_meta), 0)
    with pytest.raises(ProtocolError, match="metadata"):
        FrameDecoder().feed(header + bad_meta)


def test_large_payload_is_read_into_its_own_buffer():
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = b"".join(bytes(b) for b in encode_frame(Kind.ONEWAY, 3, payload))
    decoder = FrameDecoder()
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


def test_encoder_keeps_large_payloads_separate_for_gather_writes():
    payload = bytes(LARGE_PAYLOAD)
    buffers = encode_frame(Kind.REQUEST, 1, payload, method="A.b")
    assert len(buffers) == 2 and buffers[1] is payload
    assert len(buffers[0]) == HEADER_SIZE + 3
    assert len(encode_frame(Kind.REQUEST, 1, b"small")) == 1


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
