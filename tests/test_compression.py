"""Compression negotiated in HELLO (docs/protocol.md, "Compression"): real connections over
every transport with the C and the Python paths, hand-built bombs from a raw peer, and the
sans-IO core driven directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import threading

import msgpack
import pytest
import zstandard

import polyrpc
from polyrpc.errors import ProtocolError
from polyrpc.rpc import connection as rpc_connection
from polyrpc.session.core import (
    OnewayReceived,
    RequestFailed,
    RequestReceived,
    SessionConfig,
    SessionCore,
)
from polyrpc.wire import compression
from polyrpc.wire.compression import DecompressionRefused, Zstd
from polyrpc.wire.frames import FLAG_COMPRESSED, FrameDecoder, Kind, Limits, encode_frame
from tests.test_conformance import Recorder
from tests.test_conformance import server as message_server
from tests.test_session_core import Clock, events, pair, sent_frames, wire

pytestmark = pytest.mark.usefixtures("impl")  # the C paths (routing, call server) and Python's

TEXT = json.dumps(
    [
        {"id": i, "name": f"user-{i % 97}", "active": i % 3 == 0, "tags": ["a", "b"]}
        for i in range(6000)
    ]
)
"""About 400 KB of JSON records: compresses about tenfold."""
RANDOM = random.Random(7).randbytes(64 << 10)
"""Incompressible: sent as it is even over the threshold."""


class Echo:
    async def echo(self, value):
        return value

    async def blob(self, size: int) -> bytes:
        """A bytes result: the C call server answers these itself when small."""
        return b"polyrpc " * (size // 8)

    async def items(self, count: int):
        for _ in range(count):
            yield TEXT

    async def total(self, chunks) -> int:
        return sum([len(chunk) async for chunk in chunks])


def zstd_frame(data: bytes, *, declare: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=declare).compress(data)


def lying(data: bytes, declared: int) -> bytes:
    """A zstd frame of ``data`` whose header declares ``declared`` bytes instead."""
    packed = bytearray(zstd_frame(data))
    descriptor = packed[4]
    field = {0: 1, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    assert descriptor >> 6 >= 2, "use data over 64 KiB: a 4- or 8-byte size field"
    at = 5 + (0 if descriptor & 0x20 else 1)
    packed[at : at + field] = declared.to_bytes(field, "little")
    assert zstandard.frame_content_size(bytes(packed)) == declared
    return bytes(packed)


@contextlib.asynccontextmanager
async def served(endpoint, client_options=None, **server_options):
    async with polyrpc.serve(endpoint.listen_url, Echo(), **server_options) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(
            url, **({"compression": "zstd"} if client_options is None else client_options)
        ) as client:
            yield server, client


def server_side(server) -> rpc_connection.RpcConnection:
    (connection,) = server.connections
    return connection


# ------------------------------------------------------------- library
def test_zstd_refuses_bombs_before_decompressing():
    zstd = Zstd()
    data = TEXT.encode()
    packed = zstd.compress(data)
    assert packed is not None and len(packed) < len(data) // 5
    assert zstd.decompress(packed, len(data)) == data
    assert zstd.compress(RANDOM) is None  # no gain: sent as it is
    with pytest.raises(DecompressionRefused, match="over the limit") as over:
        zstd.decompress(zstd_frame(bytes(8 << 20)), 1 << 20)
    assert over.value.code == "decompressed_too_large"
    with pytest.raises(DecompressionRefused, match="does not declare") as undeclared:
        zstd.decompress(zstd_frame(data, declare=False), 1 << 30)
    assert undeclared.value.code == "bad_compressed_payload"
    with pytest.raises(DecompressionRefused, match="declared 1000 bytes") as lie:
        zstd.decompress(lying(data, 1000), 1 << 30)
    assert lie.value.code == "bad_compressed_payload"
    with pytest.raises(DecompressionRefused, match="not a zstd frame"):
        zstd.decompress(b"not zstd at all", 1 << 30)


def test_a_missing_zstandard_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(compression, "_per_thread", threading.local())  # none made yet
    with pytest.raises(ImportError, match=r"pip install 'polyrpc\[zstd\]'"):
        SessionConfig(compression="zstd")
    assert not compression.available("zstd")
    with pytest.raises(ValueError, match="unknown compression 'lzma'"):
        SessionConfig(compression="lzma")


# ------------------------------------------------------- over transports
async def test_large_arguments_and_results_travel_compressed(endpoint, impl):
    async with served(endpoint) as (server, client):
        connection = server_side(server)
        assert client._compression is not None and connection._compression is not None
        assert client.peer_info["compression"] == "zstd"
        sent, received = client.bytes_out, client.bytes_in
        assert await client.call("Echo.echo", TEXT) == TEXT
        assert client.bytes_out - sent < len(TEXT) // 5
        assert client.bytes_in - received < len(TEXT) // 5
        call_server = rpc_connection.EagerServer  # None where pure Python is forced
        if impl == "c" and call_server is not None:  # it serves the plain requests here
            assert isinstance(connection._request_handler, call_server)
        # a bytes result over the threshold: the C call server hands it to respond()
        received = client.bytes_in
        assert await client.call("Echo.blob", 256 << 10) == b"polyrpc " * (32 << 10)
        assert client.bytes_in - received < (256 << 10) // 20
        # a raw bytes argument, a streamed result and a streamed argument
        sent = client.bytes_out
        assert await client.call("Echo.echo", TEXT.encode()) == TEXT.encode()
        assert client.bytes_out - sent < len(TEXT) // 5
        received = client.bytes_in
        assert [item async for item in client.stream("Echo.items", 3)] == [TEXT] * 3
        assert client.bytes_in - received < 3 * len(TEXT) // 5

        async def chunks():
            for _ in range(3):
                yield TEXT

        sent = client.bytes_out
        assert await client.call("Echo.total", chunks()) == 3 * len(TEXT)
        assert client.bytes_out - sent < 3 * len(TEXT) // 5


async def test_small_and_incompressible_payloads_go_as_they_are(endpoint):
    async with served(endpoint, compression_threshold=4096) as (_, client):
        small = "x" * 1000  # compressible, but under the client's threshold (1024)
        sent = client.bytes_out
        assert await client.call("Echo.echo", small) == small
        assert client.bytes_out - sent > len(small)
        received = client.bytes_in
        text = "y" * 3000  # over the client's threshold, under the server's (4096)
        assert await client.call("Echo.echo", text) == text
        assert client.bytes_in - received > len(text)
        sent, received = client.bytes_out, client.bytes_in
        assert await client.call("Echo.echo", RANDOM) == RANDOM
        assert client.bytes_out - sent > len(RANDOM)
        assert client.bytes_in - received > len(RANDOM)


async def test_messages_travel_compressed(endpoint):
    """The message API: requests, replies and one-way messages both ways."""
    async with (
        message_server(endpoint) as (_, url),
        await polyrpc.dial(url, compression="zstd") as conn,
    ):
        sent, received = conn.bytes_out, conn.bytes_in
        assert await conn.request(TEXT, timeout=30) == TEXT
        await conn.send(TEXT.encode())
        assert await asyncio.wait_for(conn.receive(), 30) == TEXT.encode()
        assert conn.bytes_out - sent < 2 * len(TEXT) // 5
        assert conn.bytes_in - received < 2 * len(TEXT) // 5


@pytest.mark.parametrize(
    ("client_options", "server_options"),
    [({}, {}), ({"compression": "zstd"}, {"accept_compression": ()})],
    ids=["not-offered", "refused"],
)
async def test_without_agreement_nothing_is_compressed(endpoint, client_options, server_options):
    async with served(endpoint, client_options, **server_options) as (server, client):
        assert client._compression is None and server_side(server)._compression is None
        assert "compression" not in client.peer_info
        sent, received = client.bytes_out, client.bytes_in
        assert await client.call("Echo.echo", TEXT) == TEXT
        assert client.bytes_out - sent > len(TEXT)
        assert client.bytes_in - received > len(TEXT)


async def test_a_raw_peers_bombs_are_refused_and_the_connection_serves_on(endpoint, caplog):
    """Declared over max_frame, a lying size, no size: each request gets its ERROR, a
    one-way bomb is dropped with a warning, and a valid compressed call is answered."""
    hello = encode_frame(
        Kind.HELLO, 0, metadata={"version": "1", "codec": "msgpack", "compression": "zstd"}
    )[0]
    big = msgpack.packb([[TEXT], {}])

    def request(seq: int, payload: bytes) -> list:
        return encode_frame(
            Kind.REQUEST, seq, payload, method="Echo.echo", codec=1, flags=FLAG_COMPRESSED
        )

    bombs = {
        3: (zstd_frame(bytes(4 << 20)), "decompressed_too_large"),
        5: (lying(big, 1000), "bad_compressed_payload"),
        7: (zstd_frame(big, declare=False), "bad_compressed_payload"),
    }
    oneway = encode_frame(
        Kind.ONEWAY,
        0,
        zstd_frame(bytes(4 << 20)),
        method="Echo.echo",
        codec=1,
        flags=FLAG_COMPRESSED,
    )
    frames = [hello, *oneway]
    for seq, (payload, _) in bombs.items():
        frames += request(seq, payload)
    frames += request(9, zstd_frame(big))
    limits = Limits(max_frame=1 << 20)
    async with polyrpc.serve(endpoint.listen_url, Echo(), limits=limits) as server:
        raw = await endpoint.transport.dial(
            endpoint.transport.parse(endpoint.client_url(server.urls[0]))
        )
        recorder = Recorder()
        raw.set_receiver(recorder)
        with caplog.at_level(logging.WARNING, "polyrpc"):
            await raw.send(frames)
            decoder = FrameDecoder(Limits())
            answers = {}
            async with asyncio.timeout(10):
                while len(answers) < 4:
                    await asyncio.sleep(0.01)
                    data, recorder.data = bytes(recorder.data), bytearray()
                    for frame in decoder.feed(data):
                        if frame.kind == Kind.HELLO:
                            assert frame.metadata["compression"] == "zstd"
                        elif frame.seq:
                            payload = frame.payload
                            if frame.flags & FLAG_COMPRESSED:
                                payload = zstandard.ZstdDecompressor().decompress(payload)
                            answers[frame.seq] = (Kind(frame.kind), msgpack.unpackb(payload))
        for seq, (_, code) in bombs.items():
            kind, body = answers[seq]
            assert kind == Kind.ERROR and body["code"] == code, body
            assert body["type"] == "DecompressionRefused"
        assert "4194304 bytes decompressed, over the limit" in answers[3][1]["message"]
        assert answers[9] == (Kind.RESPONSE, TEXT)
        assert any("ONEWAY 0 refused" in r.getMessage() for r in caplog.records)
        assert not recorder.eof.is_set() and not recorder.lost.is_set()
        raw.abort()


# ------------------------------------------------------------- sans-IO core
def test_core_negotiates_and_round_trips_compressed_payloads():
    clock = Clock()
    client, server = pair(clock, client_options={"compression": "zstd"}, server_options={})
    seq, _ = client.begin_request(TEXT, "Echo.echo")
    client.begin_request(TEXT, "Echo.echo")
    sent = b"".join(bytes(buffer) for buffer in client.data_to_send())
    for request in FrameDecoder().feed(sent):
        assert request.flags == FLAG_COMPRESSED and len(request.payload) < len(TEXT) // 5
    server.receive_data(sent)
    arrived = events(server)
    assert [type(event) for event in arrived] == [RequestReceived, RequestReceived]
    received = [event.frame for event in arrived]
    assert [server.decode(frame) for frame in received] == [TEXT, TEXT]
    assert [frame.flags for frame in received] == [0, 0]
    server.respond(seq, TEXT)
    server.respond(seq + 2, "small")
    reply, small = sent_frames(server)
    assert reply.flags == FLAG_COMPRESSED and small.flags == 0


def test_core_sends_nothing_compressed_to_a_peer_that_did_not_agree():
    clock = Clock()
    client, server = pair(
        clock, client_options={"compression": "zstd"}, server_options={"accept_compression": ()}
    )
    client.begin_request(TEXT, "Echo.echo")
    (request,) = sent_frames(client)
    assert request.flags == 0 and len(request.payload) > len(TEXT)
    client, server = pair(clock, client_options={}, server_options={})
    server.respond(1, TEXT)
    (reply,) = sent_frames(server)
    assert reply.flags == 0


def test_core_refuses_a_hello_reply_naming_a_compression_not_offered():
    clock = Clock()
    client = SessionCore(SessionConfig(), is_client=True, clock=clock)
    client.send_hello()
    client.data_to_send()
    meta = {"version": "1", "codec": "msgpack", "compression": "zstd"}
    client.receive_data(wire(Kind.HELLO, 0, metadata=meta, flags=1))
    failed = events(client)
    assert any("not offered" in str(getattr(e, "error", "")) for e in failed), failed


def test_core_refuses_bombs_for_replies_one_way_messages_and_stream_items(caplog):
    clock = Clock()
    client, _ = pair(
        clock,
        client_options={"compression": "zstd", "limits": Limits(max_frame=1 << 20)},
        server_options={},
    )
    bomb = zstd_frame(bytes(4 << 20))
    seq, _ = client.begin_request(TEXT, "Echo.echo")
    stream_seq, _ = client.begin_request(1, "Echo.items")
    client.data_to_send()
    with caplog.at_level(logging.WARNING, "polyrpc"):
        client.receive_data(wire(Kind.ONEWAY, 0, bomb, flags=FLAG_COMPRESSED, method="m"))
        client.receive_data(wire(Kind.RESPONSE, seq, bomb, codec=1, flags=FLAG_COMPRESSED))
        client.receive_data(
            wire(Kind.STREAM_ITEM, stream_seq, bomb, codec=1, flags=FLAG_COMPRESSED)
        )
    failed = events(client)
    assert [type(e) for e in failed] == [RequestFailed, RequestFailed]
    assert [e.seq for e in failed] == [seq, stream_seq]
    for event in failed:
        assert isinstance(event.error, DecompressionRefused)
        assert event.error.code == "decompressed_too_large"
    (cancel,) = sent_frames(client)  # the stream's producer is told to stop
    assert cancel.kind == Kind.CANCEL and cancel.seq == stream_seq
    assert sum("refused" in r.getMessage() for r in caplog.records) == 3
    # the connection serves on: a valid compressed message arrives whole
    client.receive_data(
        wire(Kind.ONEWAY, 0, zstd_frame(TEXT.encode()), flags=FLAG_COMPRESSED, method="m")
    )
    (event,) = events(client)
    assert isinstance(event, OnewayReceived) and event.frame.payload == TEXT.encode()


def test_core_answers_an_argument_stream_bomb_and_cancels_its_handler():
    clock = Clock()
    _, server = pair(
        clock,
        client_options={"compression": "zstd"},
        server_options={"limits": Limits(max_frame=1 << 20)},
    )
    server.receive_data(
        wire(Kind.STREAM_ITEM, 1, zstd_frame(bytes(4 << 20)), flags=FLAG_COMPRESSED)
    )
    (error,) = sent_frames(server)
    assert error.kind == Kind.ERROR and error.seq == 1
    assert server.remote_error(error).code == "decompressed_too_large"
    (cancel,) = events(server)
    assert cancel.frame.kind == Kind.CANCEL and cancel.frame.seq == 1


def test_a_compressed_control_frame_that_fails_is_a_protocol_error():
    clock = Clock()
    _, server = pair(clock, client_options={"compression": "zstd"}, server_options={})
    server.receive_data(wire(Kind.CREDIT, 1, b"garbage", flags=FLAG_COMPRESSED))
    assert isinstance(server.close_reason, ProtocolError)
