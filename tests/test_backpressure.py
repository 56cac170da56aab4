"""Backpressure after authentication, over every transport and both codec paths.

A peer's notifications share the window of its calls (and a byte budget): over it the
server stops reading from that peer instead of queueing without bound. A peer that does
not read its replies stops being served until it does. Either way other peers are
served normally and nothing is lost once the peer catches up. See docs/architecture.md
("What a peer can cost you").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import polyrpc
from bench.budgets import rss
from polyrpc.wire import frames

NOTIFY_WINDOW = 8
"""The server's max_concurrent_calls in these tests: the window notifications share."""


class Gate:
    """Handlers that wait until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.started = 0
        self.finished = 0
        self.served = 0

    async def note(self, data: bytes) -> None:
        self.started += 1
        await self.open.wait()
        self.finished += 1

    async def blob(self, size: int) -> bytes:
        self.served += 1
        return b"r" * size

    async def ping(self) -> str:
        return "pong"


async def _settle(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def _steady(value, quiet: float = 1.0, seconds: float = 30.0) -> int:
    """Wait until ``value()`` is positive and has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + seconds
    last, since = value(), time.monotonic()
    while not last or time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still changing: {last}"
        await asyncio.sleep(0.05)
        if value() != last:
            last, since = value(), time.monotonic()
    return last


async def _ping_latency(url: str) -> float:
    async with polyrpc.connect(url) as other:
        started = time.perf_counter()
        for _ in range(5):
            assert await other.call("Gate.ping", timeout=10) == "pong"
        return (time.perf_counter() - started) / 5


async def test_notifications_over_the_window_pause_reading(endpoint, impl):
    gate = Gate()
    async with polyrpc.serve(
        endpoint.listen_url, gate, max_concurrent_calls=NOTIFY_WINDOW
    ) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url) as client:
            for i in range(5 * NOTIFY_WINDOW):
                await client.notify("Gate.note", i.to_bytes(4, "little") * 256)
            await _settle(lambda: gate.started >= NOTIFY_WINDOW)
            await asyncio.sleep(0.3)  # give a server that did not pause time to start more
            assert gate.started == NOTIFY_WINDOW
            assert await _ping_latency(url) < 1.0  # other peers are served meanwhile
            gate.open.set()
            await _settle(lambda: gate.finished == 5 * NOTIFY_WINDOW)  # nothing lost


async def test_notifications_over_the_byte_budget_pause_reading(endpoint, impl):
    gate = Gate()
    budget, size = 256 << 10, 64 << 10
    async with polyrpc.serve(endpoint.listen_url, gate, max_inbox_bytes=budget) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url) as client:

            async def flood() -> None:  # its writes wait once the server stops reading
                for _ in range(40):
                    await client.notify("Gate.note", b"n" * size)

            sender = asyncio.create_task(flood())
            await _settle(lambda: gate.started >= budget // size)
            await asyncio.sleep(0.3)
            # (the one that went over the budget was started too)
            assert budget // size <= gate.started <= budget // size + 1
            gate.open.set()
            await asyncio.wait_for(sender, 30)
            await _settle(lambda: gate.finished == 40)


async def test_a_peer_that_does_not_read_its_replies_is_not_served(endpoint, impl):
    gate = Gate()
    calls, size = 200, 256 << 10
    async with polyrpc.serve(endpoint.listen_url, gate) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url, max_in_flight=calls) as client:
            client.byte_stream.pause_reading()  # reads nothing more: replies pile up
            pending = [asyncio.create_task(client.call("Gate.blob", size)) for _ in range(calls)]
            served = await _steady(lambda: gate.served)
            (conn,) = server.connections
            # stopped serving it (after filling what the transport buffers on the way, up to
            # the client's receive window on QUIC): what is queued stays near the high-water mark
            assert served < calls
            stream = conn.byte_stream
            assert stream.write_buffer_size <= stream.high_water + 2 * size
            assert await _ping_latency(url) < 1.0
            client.byte_stream.resume_reading()
            results = await asyncio.wait_for(asyncio.gather(*pending), 60)
            assert gate.served == calls
            assert all(result == b"r" * size for result in results)  # nothing lost


async def test_held_frames_are_served_in_order_after_the_pause(endpoint, impl):
    """Calls, notifications and replies read before a pause keep their order after it."""
    gate = Gate()
    async with polyrpc.serve(endpoint.listen_url, gate, max_concurrent_calls=2) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url) as client:
            for i in range(6):
                await client.notify("Gate.note", bytes([i]))
            results = [asyncio.create_task(client.call("Gate.blob", n)) for n in range(1, 6)]
            await _settle(lambda: gate.started == 2)
            await asyncio.sleep(0.1)
            assert not any(task.done() for task in results)
            gate.open.set()
            assert await asyncio.wait_for(asyncio.gather(*results), 10) == [
                b"r" * n for n in range(1, 6)
            ]
            await _settle(lambda: gate.finished == 6)


class Load:
    """A real server's services: a slow notification handler, big results, a ping."""

    async def note(self, data: bytes) -> None:
        await asyncio.sleep(1.0)

    async def blob(self, size: int) -> bytes:
        return b"x" * size

    async def ping(self) -> str:
        return "pong"


LOAD = Load()
SERVER = """
import sys
from polyrpc.cli import main
sys.exit(main(["serve", "tcp@127.0.0.1:0", "--object", "test_backpressure:LOAD"]))
"""


def _rss_mib(pid: int) -> float:
    return rss(pid) / (1 << 20)


@contextlib.contextmanager
def _real_server(pure_python: str):
    env = dict(os.environ, POLYRPC_PURE_PYTHON=pure_python, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().split()[-1]
    finally:
        proc.kill()
        proc.wait()


async def _worst_ping(url: str, seconds: float) -> float:
    worst, until = 0.0, time.monotonic() + seconds
    async with polyrpc.connect(url) as other:
        while time.monotonic() < until:
            started = time.perf_counter()
            assert await other.call("Load.ping", timeout=10) == "pong"
            worst = max(worst, time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return worst


async def _peak_and_worst_ping(pid: int, base: float, url: str, seconds: float) -> tuple:
    """(peak server RSS growth in MiB over ``base``, worst canary call) over ``seconds``."""
    ping = asyncio.create_task(_worst_ping(url, seconds))
    peak = 0.0
    for _ in range(int(seconds / 0.2) + 5):
        await asyncio.sleep(0.2)
        peak = max(peak, _rss_mib(pid) - base)
    return peak, await ping


@pytest.mark.parametrize("pure_python", ["0", "1"], ids=["c", "python"])
async def test_a_real_server_stays_bounded_under_a_notification_flood(pure_python):
    with _real_server(pure_python) as (proc, url):
        base = _rss_mib(proc.pid)
        async with polyrpc.connect(url) as client:
            data = b"y" * (1 << 20)

            async def flood() -> None:
                for _ in range(300):
                    await client.notify("Load.note", data)

            sender = asyncio.create_task(flood())
            peak, worst = await _peak_and_worst_ping(proc.pid, base, url, 4.0)
            sender.cancel()
            client.abort()
        print(f"notify flood ({pure_python=}): server RSS +{peak:.0f} MiB, worst ping {worst:.3f}s")
        assert peak < 100  # before: every 1 MiB notification held until its handler ran
        assert worst < 1.0


@pytest.mark.parametrize("pure_python", ["0", "1"], ids=["c", "python"])
async def test_a_real_server_stays_bounded_when_replies_are_not_read(pure_python):
    calls, size = 600, 1 << 20
    with _real_server(pure_python) as (proc, url):
        base = _rss_mib(proc.pid)
        host, port = url.split("@")[1].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        hello = {"version": str(frames.VERSION), "codec": "msgpack", "features": ""}
        writer.write(b"".join(frames.encode_frame(int(frames.Kind.HELLO), 0, metadata=hello)))
        request = msgpack.packb([[size], {}])
        for i in range(calls):
            frame = frames.encode_frame(
                int(frames.Kind.REQUEST), 2 * i + 1, request, method="Load.blob", codec=1
            )
            writer.write(b"".join(frame))
        await writer.drain()
        peak, worst = await _peak_and_worst_ping(proc.pid, base, url, 3.0)
        print(
            f"unread replies ({pure_python=}): server RSS +{peak:.0f} MiB, worst ping {worst:.3f}s"
        )
        assert peak < 200  # before: every reply buffered, +1 MiB each
        assert worst < 1.0
        writer.transport.resume_reading()  # type: ignore[attr-defined]
        decoder, replies = frames.PYTHON.FrameDecoder(), 0
        while replies < calls:
            data = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert data, f"the server closed after {replies} replies"
            replies += sum(f.kind == frames.Kind.RESPONSE for f in decoder.feed(data))
        writer.close()
