"""The conformance suite: the same behaviour checked over every usable transport.

A transport joins by registering itself; see conftest.usable_transports().
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import polyrpc
from polyrpc.stream.trait import BufferedReceiver, HalfClose
from polyrpc.wire.codecs import codec_by_id
from polyrpc.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    FrameDecoder,
    Kind,
    encode_frame,
)

PEER = Path(__file__).with_name("peer.py")
SIZES = [0, 1, 64 << 10, 1 << 20, 16 << 20]


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes so corruption or reordering shows."""
    block = bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


async def echo_messages(conn: polyrpc.Connection) -> None:
    async for message in conn:
        await conn.send(message)


@contextlib.asynccontextmanager
async def server(endpoint, handler=echo_messages, on_request=lambda m: m, **options):
    listener = await polyrpc.listen(endpoint.listen_url, handler, on_request=on_request, **options)
    try:
        yield listener, endpoint.client_url(listener.url)
    finally:
        await listener.close()


class Recorder:
    """A raw StreamReceiver that records what a stream delivers."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None

    def data_received(self, data) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof.set()

    def connection_lost(self, exc) -> None:
        self.lost_exc = exc
        self.lost.set()

    async def closed_by_peer(self) -> None:
        """Wait for the peer to end the stream: EOF (TCP FIN) or a reset."""
        eof, lost = asyncio.ensure_future(self.eof.wait()), asyncio.ensure_future(self.lost.wait())
        await asyncio.wait([eof, lost], return_when=asyncio.FIRST_COMPLETED)
        eof.cancel()
        lost.cancel()


class UndeclaredRecorder(Recorder):
    """Has methods named like a BufferedReceiver's but does not declare the capability."""

    def get_buffer(self, sizehint: int) -> memoryview:
        raise AssertionError("get_buffer called on a receiver that is not a BufferedReceiver")

    def buffer_updated(self, nbytes: int) -> None:
        raise AssertionError("buffer_updated called on a receiver that is not a BufferedReceiver")


class BufferedRecorder(Recorder, BufferedReceiver):
    """Declares buffered receive: bytes are read into its own small buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.area = memoryview(bytearray(4096))
        self.reads = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.area

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.data += self.area[:nbytes]


READS_INTO_BUFFERS = {"tcp", "tls", "unix", "kcp"}
"""The transports that read into a BufferedReceiver's buffer (the others call data_received)."""


def error_frames(data: bytes) -> list[dict]:
    """The bodies of the ERROR frames in what a raw peer received."""
    frames = FrameDecoder(polyrpc.Limits()).feed(bytes(data))
    return [codec_by_id(f.codec).decode(f.payload) for f in frames if f.kind == Kind.ERROR]


HELLO = encode_frame(Kind.HELLO, 0, metadata={"version": "1", "codec": "msgpack"})[0]


async def hold_handshakes(endpoint, url: str, handshaking: set, count: int) -> list:
    """``count`` raw peers that start a HELLO and never finish it, once the listening side
    counts them in ``handshaking``."""
    transport = endpoint.transport
    silent = []
    for _ in range(count):
        raw = await transport.dial(transport.parse(url))
        raw.set_receiver(Recorder())
        await raw.send([HELLO[:10]])
        silent.append(raw)
    for _ in range(200):
        if len(handshaking) == count:
            break
        await asyncio.sleep(0.01)
    assert len(handshaking) == count
    return silent


async def assert_newcomers_refused(endpoint, url: str, count: int = 2) -> None:
    """Raw newcomers over ``max_handshaking`` are closed at once, told why, not counted."""
    transport = endpoint.transport
    extra = []
    for _ in range(count):
        raw = await transport.dial(transport.parse(url))
        recorder = Recorder()
        raw.set_receiver(recorder)
        with contextlib.suppress(polyrpc.ConnectionLost):
            await raw.send([HELLO[:10]])
        extra.append((raw, recorder))
    for raw, recorder in extra:
        await asyncio.wait_for(recorder.closed_by_peer(), 2.5)
        assert [body["code"] for body in error_frames(recorder.data)] == ["too_many_handshakes"]
        raw.abort()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
async def test_message_sizes_arrive_intact(endpoint, size):
    async with server(endpoint) as (_, url), await polyrpc.dial(url) as conn:
        payload = pattern(size, seed=size % 7)
        assert await conn.request(payload, timeout=60) == payload
        await conn.send(payload)
        assert await asyncio.wait_for(conn.receive(), 60) == payload


async def test_mixed_sizes_keep_order(endpoint):
    sizes = [s for s in SIZES if s <= 1 << 20] * 3
    async with server(endpoint) as (_, url), await polyrpc.dial(url) as conn:
        for i, size in enumerate(sizes):
            await conn.send(pattern(size, seed=i))
        for i, size in enumerate(sizes):
            assert await asyncio.wait_for(conn.receive(), 30) == pattern(size, seed=i)


async def test_thousand_messages_in_flight(endpoint):
    async with server(endpoint) as (_, url), await polyrpc.dial(url, max_in_flight=1000) as conn:
        replies = await asyncio.wait_for(
            asyncio.gather(*(conn.request({"n": i}) for i in range(1000))), 60
        )
        assert replies == [{"n": i} for i in range(1000)]
        for i in range(1000):
            await conn.send(i)
        assert [await asyncio.wait_for(conn.receive(), 30) for _ in range(1000)] == list(
            range(1000)
        )


async def test_both_directions_at_once(endpoint):
    count, size = 200, 16 << 10
    received_by_server: list = []

    async def both_ways(conn: polyrpc.Connection) -> None:
        async def pump() -> None:
            for i in range(count):
                await conn.send(pattern(size, seed=i))

        sender = asyncio.create_task(pump())
        for _ in range(count):
            received_by_server.append(await conn.receive())
        await sender

    async with server(endpoint, both_ways) as (_, url), await polyrpc.dial(url) as conn:

        async def pump() -> None:
            for i in range(count):
                await conn.send(pattern(size, seed=i + 1))

        sender = asyncio.create_task(pump())
        got = [await asyncio.wait_for(conn.receive(), 30) for _ in range(count)]
        await sender
        assert got == [pattern(size, seed=i) for i in range(count)]
    assert received_by_server == [pattern(size, seed=i + 1) for i in range(count)]


async def test_stream_eof_and_half_close(endpoint):
    """At the stream level: write_eof lets the other side answer before it closes too."""
    transport = endpoint.transport
    accepted: list = []

    def on_stream(stream) -> None:
        recorder = Recorder()
        stream.set_receiver(recorder)
        accepted.append((stream, recorder))

    listener = await transport.listen(transport.parse(endpoint.listen_url), on_stream)
    try:
        client = await transport.dial(transport.parse(endpoint.client_url(listener.url)))
        mine = Recorder()
        client.set_receiver(mine)
        await client.send([b"question"])
        assert isinstance(client, HalfClose)  # every built-in stream declares it
        if not client.can_write_eof:
            with pytest.raises(polyrpc.ConnectionLost, match="half-close"):
                client.write_eof()
            await client.close()
            return
        client.write_eof()
        for _ in range(500):
            if accepted:
                break
            await asyncio.sleep(0.01)
        server_stream, theirs = accepted[0]
        await asyncio.wait_for(theirs.eof.wait(), 10)
        assert bytes(theirs.data) == b"question"
        await server_stream.send([b"answer after ", b"eof"])
        await server_stream.close()
        await asyncio.wait_for(mine.eof.wait(), 10)
        assert bytes(mine.data) == b"answer after eof"
        await asyncio.wait_for(mine.lost.wait(), 10)
        with pytest.raises(polyrpc.ConnectionLost):
            await client.send([b"too late"])
        await client.close()
    finally:
        await listener.close()


@pytest.mark.parametrize("make", [UndeclaredRecorder, BufferedRecorder])
async def test_stream_delivers_to_plain_and_buffered_receivers(endpoint, make):
    """Both receive paths carry every byte in order: ``data_received`` for a receiver that
    does not declare BufferedReceiver (methods of the same names are not looked for), its
    own buffer for one that does."""
    transport = endpoint.transport
    accepted: list = []

    def on_stream(stream) -> None:
        recorder = make()
        stream.set_receiver(recorder)
        accepted.append(recorder)

    payload = pattern(1 << 20, seed=3)
    listener = await transport.listen(transport.parse(endpoint.listen_url), on_stream)
    try:
        client = await transport.dial(transport.parse(endpoint.client_url(listener.url)))
        client.set_receiver(Recorder())
        await client.send([payload[:1000], payload[1000:]])
        for _ in range(500):
            if accepted and len(accepted[0].data) >= len(payload):
                break
            await asyncio.sleep(0.02)
        assert bytes(accepted[0].data) == payload
        if make is BufferedRecorder and endpoint.scheme in READS_INTO_BUFFERS:
            assert accepted[0].reads > 0
        await client.close()
    finally:
        await listener.close()


async def test_a_stream_lost_before_its_receiver_is_set_replays_data_and_loss(endpoint):
    """What arrived (data, then the end) before set_receiver reaches the receiver set later."""
    transport = endpoint.transport
    accepted: list = []
    listener = await transport.listen(transport.parse(endpoint.listen_url), accepted.append)
    try:
        client = await transport.dial(transport.parse(endpoint.client_url(listener.url)))
        client.set_receiver(Recorder())
        await client.send([b"early words"])
        for _ in range(500):
            if accepted:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # let the data reach the server stream's early buffer
        client.abort()
        server_stream = accepted[0]
        await asyncio.sleep(0.5)  # a transport that reads ahead has seen the abort by now
        late = Recorder()
        server_stream.set_receiver(late)
        await asyncio.wait_for(late.closed_by_peer(), 10)
        assert bytes(late.data) == b"early words"
        server_stream.abort()
    finally:
        await listener.close()


async def test_graceful_close_finishes_in_flight_requests(endpoint):
    async def slow(message):
        await asyncio.sleep(0.2)
        return message

    async with server(endpoint, on_request=slow) as (_, url):
        conn = await polyrpc.dial(url)
        calls = [asyncio.create_task(conn.request(i)) for i in range(10)]
        await asyncio.sleep(0.05)
        await conn.close()
        assert [await c for c in calls] == list(range(10))
        with pytest.raises(polyrpc.ConnectionLost):
            await conn.request(1)


async def test_heartbeats_stop_while_the_stream_is_closing(endpoint):
    """A close that waits on a slow reader outlives many heartbeat periods: no heartbeat is
    written to the closing stream (quic raised from the timer), and every message arrives."""
    received: list[bytes] = []
    start_reading = asyncio.Event()

    async def late_reader(conn: polyrpc.Connection) -> None:
        await start_reading.wait()
        async for message in conn:
            received.append(message)

    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    chunk = pattern(256 << 10)
    try:
        async with server(endpoint, late_reader, max_inbox_bytes=1 << 20) as (_, url):
            conn = await polyrpc.dial(url, heartbeat_interval=0.01, idle_timeout=0)
            sent = [asyncio.create_task(conn.send(chunk)) for _ in range(16)]
            await asyncio.sleep(0.05)
            closing = asyncio.create_task(conn.close())
            await asyncio.sleep(0.3)  # about 30 heartbeat periods with the stream closing
            start_reading.set()
            await asyncio.wait_for(closing, 30)
            await asyncio.gather(*sent)
            for _ in range(500):
                if len(received) == len(sent):
                    break
                await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(previous)
    assert errors == []
    assert received == [chunk] * len(sent)


async def test_abort_fails_pending_with_connection_lost(endpoint):
    async def never(message):
        await asyncio.sleep(3600)

    async with server(endpoint, on_request=never) as (_, url):
        conn = await polyrpc.dial(url)
        calls = [asyncio.create_task(conn.request(i)) for i in range(5)]
        await asyncio.sleep(0.05)
        conn.abort()
        for call in calls:
            with pytest.raises(polyrpc.ConnectionLost):
                await asyncio.wait_for(call, 5)


async def test_peer_death_gives_connection_lost_promptly(endpoint):
    """Kill the server process mid-call: with the default options, every pending call fails
    within two seconds (the OS, ICMP or the transport's own probes tell; no heartbeat tuning)."""
    if endpoint.in_process:
        # the in-process transport has no process to kill: drop the server side instead
        async with server(endpoint, on_request=lambda m: asyncio.sleep(3600)) as (lst, url):
            conn = await polyrpc.dial(url)
            calls = [asyncio.create_task(conn.request(i)) for i in range(5)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            for c in list(lst.connections):
                c.byte_stream.abort()
            for call in calls:
                with pytest.raises(polyrpc.ConnectionLost):
                    await asyncio.wait_for(call, 5)
            assert time.monotonic() - started < 2.0
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(PEER), endpoint.listen_url],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        # a peer process that just started may be slow to accept its first connection
        # (rdma in an emulated VM): connecting is not what this test times
        conn = await polyrpc.dial(
            endpoint.client_url(line.strip()), timeout=60, handshake_timeout=60
        )
        assert await conn.request({"hello": 1}) == {"hello": 1}
        calls = [asyncio.create_task(conn.request({"sleep": 3600})) for _ in range(5)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        for call in calls:
            with pytest.raises(polyrpc.ConnectionLost):
                await asyncio.wait_for(call, 10)
        elapsed = time.monotonic() - started
        assert elapsed < 2.5, f"pending calls took {elapsed:.2f}s to fail"
        with pytest.raises(polyrpc.ConnectionLost):
            await conn.request(1)
    finally:
        proc.kill()
        proc.wait()


async def test_a_silent_peer_is_declared_dead_after_the_idle_timeout(endpoint):
    """A peer whose host vanished (here: its process stopped, so nothing answers and nothing
    refuses) is found by the heartbeats: pending calls fail once idle_timeout passes."""
    options = {"heartbeat_interval": 0.2, "idle_timeout": 1.0}
    if endpoint.in_process:
        # no process to stop: the server side sends nothing of its own and stops reading
        quiet = {"heartbeat_interval": 0, "idle_timeout": 0}
        async with server(endpoint, on_request=lambda m: asyncio.sleep(3600), **quiet) as (
            lst,
            url,
        ):
            conn = await polyrpc.dial(url, **options)
            calls = [asyncio.create_task(conn.request(i)) for i in range(3)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            for c in list(lst.connections):
                c.byte_stream.pause_reading()
            for call in calls:
                with pytest.raises(polyrpc.ConnectionLost, match="no data from"):
                    await asyncio.wait_for(call, 10)
            assert 0.8 < time.monotonic() - started < 3.0
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(PEER), endpoint.listen_url], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        conn = await polyrpc.dial(
            endpoint.client_url(line.strip()),
            timeout=60,
            handshake_timeout=60,
            **options,
        )
        assert await conn.request({"hello": 1}) == {"hello": 1}
        calls = [asyncio.create_task(conn.request({"sleep": 3600})) for _ in range(3)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        for call in calls:
            with pytest.raises(polyrpc.ConnectionLost, match="no data from"):
                await asyncio.wait_for(call, 10)
        elapsed = time.monotonic() - started
        assert 0.8 < elapsed < 3.0, f"declared dead after {elapsed:.2f}s (idle_timeout 1 s)"
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


async def test_slow_reader_bounds_sender_memory(endpoint):
    """A receiver that never reads must stop the sender, not let buffers grow."""
    hold = asyncio.Event()

    async def never_read(conn: polyrpc.Connection) -> None:
        await hold.wait()

    chunk = pattern(64 << 10)
    attempt = 512 << 20
    async with server(endpoint, never_read, max_inbox_bytes=1 << 20) as (_, url):
        conn = await polyrpc.dial(url)
        sent = 0
        peak_buffered = 0

        async def flood() -> None:
            nonlocal sent, peak_buffered
            while sent < attempt:
                await conn.send(chunk)
                sent += len(chunk)
                peak_buffered = max(peak_buffered, conn.byte_stream.write_buffer_size)

        task = asyncio.create_task(flood())
        await asyncio.sleep(2.0)
        assert not task.done(), (
            f"the sender was never stopped: {task.exception() if task.done() else None!r}"
        )
        # bounded: what the kernel/transport windows hold plus our own high-water mark
        assert sent < 96 << 20, f"{sent >> 20} MiB accepted although the peer reads nothing"
        assert peak_buffered <= conn.byte_stream.high_water + len(chunk) + (1 << 16)
        task.cancel()
        hold.set()
        conn.abort()


async def test_too_large_messages_fail_alone_and_the_connection_survives(endpoint):
    limits = polyrpc.Limits(max_frame=1 << 20)
    async with server(endpoint, limits=limits) as (_, url):
        conn = await polyrpc.dial(url)
        assert conn.peer_info["max_frame"] == str(1 << 20)
        for attempt in (
            lambda: conn.request(pattern(2 << 20)),
            lambda: conn.request(pattern(2 << 20), timeout=5, metadata={"k": "v"}),
            lambda: conn.send(pattern(2 << 20)),
        ):
            with pytest.raises(polyrpc.MessageTooLarge, match=f"limit of {1 << 20}") as info:
                await asyncio.wait_for(attempt(), 10)
            assert info.value.limit == 1 << 20
            assert info.value.size >= HEADER_SIZE + (2 << 20)  # the whole frame
        assert conn.in_flight == 0
        assert await conn.request(b"still here") == b"still here"
        await conn.send(b"one way")
        assert await conn.receive() == b"one way"
        await conn.close()


async def test_too_complex_messages_fail_alone_and_the_connection_survives(endpoint, caplog):
    """A one-way message whose payload would decode to far more than its size is dropped
    with a warning; a request with one gets RemoteError ``bad_payload``.
    Nothing else on the connection is lost."""
    hostile = [{}] * (1 << 20)  # 1 MiB of empty msgpack maps
    async with server(endpoint) as (_, url):
        conn = await polyrpc.dial(url)
        await conn.send(hostile)
        await conn.send("after")
        assert await asyncio.wait_for(conn.receive(), 10) == "after"
        with pytest.raises(polyrpc.RemoteError, match="payload of") as info:
            await asyncio.wait_for(conn.request(hostile), 10)
        assert info.value.code == "bad_payload"
        assert await conn.request(b"still here") == b"still here"
        assert not conn.is_closed
        await conn.close()
    dropped = [r for r in caplog.records if "one-way message from" in r.getMessage()]
    assert len(dropped) == 1 and "payload of" in dropped[0].getMessage()


async def test_too_large_reply_is_a_remote_error(endpoint):
    async with server(endpoint, on_request=lambda n: pattern(n)) as (_, url):
        conn = await polyrpc.dial(url, limits=polyrpc.Limits(max_frame=1 << 20))
        with pytest.raises(polyrpc.RemoteError, match=f"limit of {1 << 20}") as info:
            await asyncio.wait_for(conn.request(2 << 20), 10)
        assert info.value.code == "result_too_large"
        assert await conn.request(10) == pattern(10)
        await conn.close()


async def test_oversize_frame_from_a_raw_peer_gets_an_error_naming_the_limit(endpoint):
    transport = endpoint.transport
    async with server(endpoint, limits=polyrpc.Limits(max_frame=1 << 20)) as (_, url):
        good = await polyrpc.dial(url)
        raw = await transport.dial(transport.parse(url))
        recorder = Recorder()
        raw.set_receiver(recorder)
        hello = {"version": str(VERSION), "codec": "msgpack"}  # no max_frame: an old peer
        await raw.send(encode_frame(Kind.HELLO, 0, metadata=hello))
        for _ in range(500):  # the HELLO reply first
            if FrameDecoder(polyrpc.Limits()).feed(bytes(recorder.data)):
                break
            await asyncio.sleep(0.01)
        oversize = HEADER.pack(MAGIC, VERSION, Kind.REQUEST, 0, 0, 0, 1, 0, 2 << 20)
        with contextlib.suppress(polyrpc.ConnectionLost):
            await raw.send([oversize, bytes(64 << 10)])
        await asyncio.wait_for(recorder.closed_by_peer(), 15)
        frames = FrameDecoder(polyrpc.Limits()).feed(bytes(recorder.data))
        assert [f.kind for f in frames] == [Kind.HELLO, Kind.ERROR]
        assert frames[0].metadata["max_frame"] == str(1 << 20)
        body = msgpack.unpackb(frames[1].payload)
        assert frames[1].seq == 0 and body["code"] == "protocol_error"
        assert f"limit of {1 << 20}" in body["message"] and body["max_frame"] == 1 << 20
        assert await good.request(b"ok") == b"ok"
        await good.close()
        raw.abort()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 4,
        HEADER.pack(MAGIC, VERSION, Kind.HELLO, 0, 0, 0, 0, 0, 0xFFFFFFFF) + b"x" * 100,
        HEADER.pack(MAGIC, VERSION, Kind.HELLO, 0, 0, 0, 0, 0, 100)[:20],
    ],
    ids=["http", "random", "4GiB-length", "truncated"],
)
async def test_garbage_peer_is_dropped_without_harm(endpoint, garbage):
    transport = endpoint.transport
    async with server(endpoint) as (_, url):
        good = await polyrpc.dial(url)
        raw = await transport.dial(transport.parse(url))
        recorder = Recorder()
        raw.set_receiver(recorder)
        await raw.send([garbage])
        if len(garbage) < 24 and isinstance(raw, HalfClose) and raw.can_write_eof:
            raw.write_eof()
        await asyncio.wait_for(recorder.closed_by_peer(), 15)
        assert await good.request(b"ok") == b"ok"
        await good.close()
        raw.abort()


async def test_max_handshaking_refuses_newcomers_at_once(endpoint):
    """The message listener caps connections in the handshake as Server does (one shared
    HandshakeGate): newcomers over it get ``too_many_handshakes`` at once."""
    async with server(endpoint, max_handshaking=3, handshake_timeout=6.0) as (listener, url):
        assert listener.gate.limit == 3
        silent = await hold_handshakes(endpoint, url, listener.gate.handshaking, 3)
        await assert_newcomers_refused(endpoint, url)
        assert len(listener.gate.handshaking) == 3 and not listener.connections
        with pytest.raises(polyrpc.HandshakeError, match="busy") as info:
            await polyrpc.dial(url)
        assert info.value.reason == "too_many_handshakes"
        for _ in range(300):  # the silent ones time out and leave room
            if not listener.gate.handshaking:
                break
            await asyncio.sleep(0.05)
        async with await polyrpc.dial(url) as conn:
            assert await conn.request(b"in") == b"in"
        for raw in silent:
            raw.abort()


async def test_extra_info_names_transport_and_peer(endpoint):
    async with server(endpoint) as (listener, url), await polyrpc.dial(url) as conn:
        assert conn.transport == endpoint.scheme
        assert conn.extra["transport"] == endpoint.scheme
        assert conn.peer is not None
        server_side = next(iter(listener.connections))
        assert server_side.peer is not None
