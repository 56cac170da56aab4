"""Session behaviour that needs no particular transport (run over the in-process one)."""

from __future__ import annotations

import asyncio
import hmac
import time

import pytest

import polyrpc
from polyrpc import registry
from polyrpc.session import core as session_core
from polyrpc.wire.codecs import codec_by_id
from polyrpc.wire.frames import FrameDecoder, Kind, encode_frame
from tests.test_conformance import Recorder


async def test_idle_timeout_declares_a_silent_peer_dead():
    listener = await polyrpc.listen("mem@0", on_request=lambda m: m, heartbeat_interval=0)
    try:
        conn = await polyrpc.dial(listener.url, heartbeat_interval=0.05, idle_timeout=0.3)
        assert await conn.request(1) == 1
        server_side = next(iter(listener.connections))
        server_side.byte_stream.pause_reading()  # the server stops reading: no more replies
        pending = asyncio.create_task(conn.request(2))
        started = time.monotonic()
        with pytest.raises(polyrpc.ConnectionLost, match="assuming it is dead"):
            await asyncio.wait_for(pending, 5)
        assert time.monotonic() - started < 1.5
    finally:
        await listener.close(connections=False)


async def test_heartbeats_keep_an_idle_connection_alive():
    listener = await polyrpc.listen(
        "mem@0", on_request=lambda m: m, heartbeat_interval=0.05, idle_timeout=0.3
    )
    try:
        conn = await polyrpc.dial(listener.url, heartbeat_interval=0.05, idle_timeout=0.3)
        await asyncio.sleep(1.0)  # several idle timeouts long, but heartbeats flow
        assert await conn.request("still alive") == "still alive"
        await conn.close()
    finally:
        await listener.close()


async def test_window_bounds_requests_in_flight():
    release, window_full = asyncio.Event(), asyncio.Event()
    seen: list[int] = []

    async def slow(message):
        seen.append(message)
        if len(seen) == 4:
            window_full.set()
        await release.wait()
        return message

    listener = await polyrpc.listen("mem@0", on_request=slow)
    try:
        conn = await polyrpc.dial(listener.url, max_in_flight=4)
        calls = [asyncio.create_task(conn.request(i)) for i in range(10)]
        await asyncio.wait_for(window_full.wait(), 5)  # every call has tried to send by now
        assert conn.in_flight == 4 and len(seen) == 4
        release.set()
        assert await asyncio.gather(*calls) == list(range(10))
        await conn.close()
    finally:
        await listener.close()


async def test_timeouts_share_one_timer():
    listener = await polyrpc.listen("mem@0", on_request=lambda m: asyncio.sleep(10))
    try:
        conn = await polyrpc.dial(listener.url, max_in_flight=500)
        calls = [asyncio.create_task(conn.request(i, timeout=0.2)) for i in range(300)]
        await asyncio.sleep(0)  # one turn: each call's task has written its request
        assert conn.in_flight == 300
        timers = [h for h in conn.loop._scheduled if not h.cancelled()]
        # one timer for the connection: its deadlines and its heartbeat share it
        assert sum(1 for h in timers if getattr(h._callback, "__self__", None) is conn) == 1
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, polyrpc.CallTimeout) for r in results)
        conn.abort()
    finally:
        await listener.close(connections=False)


@pytest.mark.parametrize("side", ["client", "server"])
async def test_graceful_close_is_woken_by_the_work_not_a_timer(side, monkeypatch):
    """A close waiting for a reply (client) or a running handler (server) schedules no timer
    that fires meanwhile (only long limits such as close_timeout): the work ending wakes it,
    and it returns a few turns later."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(message):
        started.set()
        await release.wait()
        return message

    quiet = {"heartbeat_interval": 0, "idle_timeout": 0, "close_timeout": 30}
    listener = await polyrpc.listen("mem@0", on_request=slow, **quiet)
    try:
        conn = await polyrpc.dial(listener.url, **quiet)
        reply = asyncio.create_task(conn.request("late"))
        await started.wait()
        closing_side = conn if side == "client" else next(iter(listener.connections))
        loop = asyncio.get_running_loop()
        delays: list[float] = []
        schedule = loop.call_at

        def counting_call_at(when, callback, *args, **kwargs):
            delays.append(when - loop.time())
            return schedule(when, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_at", counting_call_at)
        closing = asyncio.create_task(closing_side.close())
        for _ in range(20):  # turns enough for a polling close to schedule its timers
            await asyncio.sleep(0)
        assert not closing.done()
        release.set()
        turns = 0
        while not closing.done():
            await asyncio.sleep(0)
            turns += 1
        monkeypatch.undo()
        assert await reply == "late"
        assert delays and min(delays) > 5, delays  # close_timeout's give-up is among them
        assert turns < 20
    finally:
        await listener.close()


async def test_graceful_close_gives_up_after_close_timeout():
    """Work that never ends holds a close only for close_timeout; then the connection is
    aborted and the request in flight fails."""
    listener = await polyrpc.listen("mem@0", on_request=lambda m: asyncio.Event().wait())
    try:
        conn = await polyrpc.dial(listener.url, close_timeout=0.2)
        stuck = asyncio.create_task(conn.request("never answered"))
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(conn.close(), 5)
        assert 0.15 < time.monotonic() - started < 2
        with pytest.raises(polyrpc.ConnectionLost, match="graceful close timed out"):
            await stuck
    finally:
        await listener.close(connections=False)


async def test_wrong_peer_gets_a_clear_handshake_error():
    """A server answering with frames that are not HELLO is reported as not polyrpc."""

    def bogus_server(stream):
        class Answer:
            def data_received(self, data):
                stream.write([b"HTTP/1.1 400 Bad Request\r\n\r\n"])

            def eof_received(self):
                pass

            def connection_lost(self, exc):
                pass

        stream.set_receiver(Answer())

    transport = polyrpc.registry.get("mem")
    listener = await transport.listen(transport.parse("mem@bogus"), bogus_server)
    try:
        with pytest.raises(polyrpc.HandshakeError, match="speaking HTTP") as info:
            await polyrpc.dial("mem@bogus")
        assert info.value.reason == "not_polyrpc"
    finally:
        await listener.close()


def test_many_frames_per_write_when_they_queue_up():
    """Frames written in one loop turn leave as one stream write (batching)."""
    writes: list[list] = []

    class RecordingStream(polyrpc.stream.trait.Stream):
        transport_name = "rec"

        def pause_reading(self): ...
        def resume_reading(self): ...
        def write(self, buffers, *, ordered=True):
            writes.append(list(buffers))

        @property
        def write_buffer_size(self):
            return 0

        async def close(self): ...
        def abort(self): ...

    async def scenario():
        from polyrpc.session.session import Session, SessionConfig

        session = Session(RecordingStream(), SessionConfig(), is_client=True)
        session._handshake.set_result(None)
        for i in range(100):
            session.begin_request(i)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return session

    asyncio.run(scenario())
    frames = FrameDecoder().feed(b"".join(b for w in writes for b in w))
    assert [f.kind for f in frames] == [Kind.REQUEST] * 100
    assert len(writes) <= 3, f"{len(writes)} writes for 100 frames"


@pytest.mark.parametrize("token", ["s3cret", "sécret-ü"])
async def test_token_is_compared_in_constant_time(token, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(session_core.hmac, "compare_digest", spy)
    listener = await polyrpc.listen("mem@0", on_request=lambda m: m, token=token)
    try:
        conn = await polyrpc.dial(listener.url, token=token)
        assert await conn.request(1) == 1
        await conn.close()
        assert compared == [(token.encode(), token.encode())]
        for wrong in (None, "guess", token + "x", "ü"):
            with pytest.raises(polyrpc.HandshakeError, match="token") as info:
                await polyrpc.dial(listener.url, token=wrong)
            assert info.value.reason == "bad_token"
        assert len(compared) == 4  # every given token went through compare_digest
    finally:
        await listener.close()


def test_a_max_frame_no_peer_would_accept_is_refused_locally():
    with pytest.raises(ValueError, match="at least 4096"):
        polyrpc.SessionConfig(limits=polyrpc.Limits(max_frame=4095))


@pytest.mark.parametrize(
    ("announced", "why"),
    [
        ("abc", "invalid max_frame"),
        ("-5", "invalid max_frame"),
        ("9" * 5000, "invalid max_frame"),
        ("１２３", "invalid max_frame"),
        ("10", "below the protocol's minimum of 4096"),
        ("4095", "below the protocol's minimum of 4096"),
    ],
)
async def test_a_hello_with_an_invalid_max_frame_is_refused_clearly(announced, why):
    listener = await polyrpc.listen("mem@0", on_request=lambda m: m)
    try:
        transport = registry.get("mem")
        raw = await transport.dial(transport.parse(listener.url))
        recorder = Recorder()
        raw.set_receiver(recorder)
        meta = {"version": "1", "codec": "msgpack", "max_frame": announced}
        await raw.send(encode_frame(Kind.HELLO, 0, metadata=meta))
        await asyncio.wait_for(recorder.closed_by_peer(), 5)
        (frame,) = FrameDecoder().feed(bytes(recorder.data))
        body = codec_by_id(frame.codec).decode(frame.payload)
        assert (frame.kind, frame.seq, body["code"]) == (Kind.ERROR, 0, "protocol_error")
        assert why in body["message"]
        raw.abort()
        conn = await polyrpc.dial(listener.url)  # the server is fine
        assert await conn.request(1) == 1
        await conn.close()
    finally:
        await listener.close()
