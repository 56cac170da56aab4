"""Stateful property test of the session and RPC layers as a hostile peer reaches them.

A real server (tcp on loopback) is driven by a raw peer that sends any sequence of frames:
handshakes in any order or malformed, requests to real and unknown methods with good or
garbage payloads, cancels, stream items, credit, heartbeats, GOAWAY, frames of any kind and
plain garbage, reconnecting when the server drops it. Invariants: the server never sends
an undecodable frame or a second final reply for one call; nothing escapes to the event
loop's exception handler; after the peer goes, the server forgets the connection and every
per-call table is empty; a well-behaved client is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import polyrpc
from polyrpc import ProtocolError
from polyrpc.wire.frames import (
    FLAG_ARG_STREAM,
    FLAG_REPLY,
    FLAG_STREAM,
    PYTHON,
    Kind,
)

FINAL = {int(Kind.RESPONSE), int(Kind.ERROR), int(Kind.STREAM_END)}
METHODS = ["Svc.add", "Svc.items", "Svc.total", "Svc.fail", "Svc.slow", "Svc.sync", "No.such", ""]
TABLES = ("_pending", "_incoming", "_result_streams", "_arg_senders")


class Svc:
    """What the server offers: plain, streaming, stream-consuming, failing, slow, sync."""

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def items(self, n: int):
        for i in range(min(int(n), 50)):
            yield i

    async def total(self, numbers) -> int:
        return sum([x async for x in numbers])

    async def fail(self) -> None:
        raise ValueError("as asked")

    async def slow(self, seconds: float) -> float:
        await asyncio.sleep(min(float(seconds), 0.2))
        return seconds

    def sync(self, x: Any) -> Any:
        return x


def frame(kind: int, seq: int, payload: bytes = b"", **kw: Any) -> bytes:
    return b"".join(bytes(b) for b in PYTHON.encode_frame(kind, seq, payload, **kw))


args_payload = st.one_of(
    st.tuples(st.lists(st.integers(-5, 60), max_size=3), st.just({})).map(
        lambda t: msgpack.packb(list(t))
    ),
    st.binary(max_size=20),
)


def call(method: str, args: list, flags: int = 0, meta: dict | None = None) -> tuple:
    return method, msgpack.packb([args, {}]), flags, meta or {}, 1


# calls a client would make (so that most requests get past decoding and run a handler)
good_calls = st.one_of(
    st.tuples(st.integers(-9, 9), st.integers(-9, 9)).map(lambda t: call("Svc.add", list(t))),
    st.integers(0, 60).map(lambda n: call("Svc.items", [n], FLAG_STREAM)),
    st.just(call("Svc.total", [None], FLAG_ARG_STREAM, {"argstream": "0"})),
    st.just(call("Svc.fail", [])),
    st.floats(0, 0.3).map(lambda s: call("Svc.slow", [s], 0, {"timeout": "0.1"})),
    st.just(call("Svc.sync", ["x"])),
)
metadata = st.dictionaries(
    st.sampled_from(["credit", "argstream", "timeout", "code", "x"]),
    st.sampled_from(["0", "1", "-1", "8", "0.05", "nan", "1e9", "", "zz"]),
    max_size=2,
)

hostile_frames = st.one_of(
    st.builds(
        lambda version, codec, flags: (
            frame(Kind.HELLO, 0, metadata={"version": version, "codec": codec}, flags=flags),
            0,
        ),
        st.sampled_from(["1", "1", "2", ""]),
        st.sampled_from(["msgpack", "msgpack", "json", "bogus"]),
        st.sampled_from([0, FLAG_REPLY]),
    ),
    st.builds(
        lambda kind, seq, flags, codec, payload, meta: (
            frame(kind, seq, payload, metadata=meta, codec=codec, flags=flags),
            seq,
        ),
        st.integers(1, 11),
        st.integers(0, 2**64 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=30),
        metadata,
    ),
    st.binary(min_size=1, max_size=40).map(lambda data: (data, 0)),
)


class HostilePeer(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.server = polyrpc.Server(handshake_timeout=2.0)
        self.server.register(Svc(), "Svc")
        self.url = self.run(self.server.start("tcp@127.0.0.1:0"))
        self.seen: set = set()  # every server-side connection, to check after the peer left
        self.next_seq = 1
        self.sent: list[int] = []
        self.reader = self.writer = None
        self.connect(True)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    def connect(self, handshake: bool) -> None:
        host, port = self.url.split("@", 1)[1].rsplit(":", 1)
        self.reader, self.writer = self.run(asyncio.open_connection(host, int(port)))
        self.decoder = PYTHON.FrameDecoder()
        self.finals: dict[int, int] = {}  # final replies (RESPONSE, ERROR, STREAM_END) by seq
        self.frames_sent: dict[int, int] = {}  # frames sent by seq: a seq may be reused
        self.closed = False
        if handshake:  # most cases start as a client does, to reach what follows HELLO
            meta = {"version": "1", "codec": "msgpack", "features": "rawarg"}
            self.send(frame(Kind.HELLO, 0, metadata=meta))

    def send(self, data: bytes, seq: int = 0) -> None:
        if self.closed:
            return
        self.frames_sent[seq] = self.frames_sent.get(seq, 0) + 1
        self.writer.write(data)
        self.pump()

    def pump(self, seconds: float = 0.01) -> None:
        """Let the server work, then read and check what it sent."""

        async def read() -> bytes:
            await asyncio.sleep(seconds)
            out = b""
            while True:
                try:
                    chunk = await asyncio.wait_for(self.reader.read(1 << 16), 0.005)
                except (TimeoutError, ConnectionError):
                    return out
                if not chunk:
                    self.closed = True
                    return out
                out += chunk

        data = self.run(read())
        self.seen.update(self.server.connections)
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            raise AssertionError(f"the server sent an undecodable frame: {exc}") from None
        for f in frames:
            if f.kind in FINAL and f.seq:
                self.finals[f.seq] = self.finals.get(f.seq, 0) + 1
                assert self.finals[f.seq] <= self.frames_sent.get(f.seq, 0), (
                    f"more final replies for seq {f.seq} than frames sent with it"
                )

    def seq(self, pick: int | None) -> int:
        if pick is not None or not self.sent:
            return pick if pick is not None else 1
        return self.sent[-1]

    # -- what the peer can do --------------------------------------------
    @rule(call=good_calls, fresh=st.sampled_from([True, True, True, False]))
    def good_request(self, call: tuple, fresh: bool) -> None:
        self.request(*call, fresh)

    @rule(
        method=st.sampled_from(METHODS),
        payload=args_payload,
        flags=st.sampled_from([0, 0, FLAG_STREAM, FLAG_ARG_STREAM, 0xFF]),
        meta=metadata,
        codec=st.sampled_from([1, 1, 0, 2, 9]),
        fresh=st.booleans(),
    )
    def request(self, method: str, payload: bytes, flags: int, meta: dict, codec: int, fresh):
        seq = self.next_seq if fresh else self.seq(None)
        self.next_seq += 2
        self.sent.append(seq)
        self.send(
            frame(
                Kind.REQUEST, seq, payload, method=method, metadata=meta, codec=codec, flags=flags
            ),
            seq,
        )

    @rule(
        kind=st.sampled_from([Kind.CANCEL, Kind.STREAM_ITEM, Kind.STREAM_END, Kind.CREDIT]),
        payload=args_payload,
        meta=metadata,
        seq=st.none() | st.integers(0, 2**64 - 1),
    )
    def call_frame(self, kind: int, payload: bytes, meta: dict, seq: int | None) -> None:
        seq = self.seq(seq)
        self.send(frame(kind, seq, payload, metadata=meta, codec=1), seq)

    @rule(flags=st.integers(0, 255))
    def heartbeat(self, flags: int) -> None:
        self.send(frame(Kind.HEARTBEAT, 0, flags=flags))

    @rule(meta=metadata)
    def goaway(self, meta: dict) -> None:
        self.send(frame(Kind.GOAWAY, 0, metadata=meta))

    @rule(method=st.sampled_from(METHODS), payload=args_payload)
    def oneway(self, method: str, payload: bytes) -> None:
        self.send(frame(Kind.ONEWAY, 0, payload, method=method, codec=1))

    @rule(what=hostile_frames)
    def hostile(self, what: tuple[bytes, int]) -> None:
        """A HELLO (again, or malformed), a frame of any kind and fields, or garbage: most
        end the connection (reconnect starts another), so they share one rule."""
        self.send(*what)

    @rule()
    def wait(self) -> None:
        self.pump(0.05)

    @precondition(lambda self: self.closed)
    @rule(handshake=st.sampled_from([True, True, True, False]))
    def reconnect(self, handshake: bool) -> None:
        self.writer.close()
        self.connect(handshake)

    @invariant()
    def nothing_escaped(self) -> None:
        assert not self.loop_errors, self.loop_errors

    def teardown(self) -> None:
        try:
            self.writer.close()
            with contextlib.suppress(Exception):
                self.run(self.writer.wait_closed())

            async def forgotten() -> None:
                while self.server.connections:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # let cancelled handlers finish

            self.run(forgotten())
            for conn in self.seen:
                for table in TABLES:
                    assert not getattr(conn, table), f"{table} not empty after close"

            async def served() -> int:
                async with await polyrpc.connect(self.url) as client:
                    return await client.call("Svc.add", 2, 3, timeout=10)

            assert self.run(served()) == 5
            assert not self.loop_errors, self.loop_errors
        finally:
            with contextlib.suppress(Exception):
                self.run(self.server.close(timeout=2))
            self.loop.close()


HostilePeer.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_a_hostile_peer_never_breaks_the_server = HostilePeer.TestCase
