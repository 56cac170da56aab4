"""quic backpressure and lifecycle: bounded memory with a slow reader, idle timeout, keepalive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest
from quic_helpers import Sink, dial, serving

import polyrpc
from polyrpc.errors import ConnectionLost
from polyrpc.testing.udp_relay import UdpRelay
from polyrpc.transports._shared.certs import self_signed_certificate
from polyrpc.transports.quic.connection import FEED_AHEAD, FEED_WINDOW_CAP, Driver

UNIT = 256 << 10
WINDOW = 512 << 10
BUFFER = 1 << 20


async def test_slow_reader_bounds_sender_memory(tmp_path) -> None:
    options = f"&window={WINDOW}&buffer={BUFFER}"
    async with serving(tmp_path, options) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}{options}")
        await client.send([b"hello"])
        stream, sink = await server.first()
        await sink.wait_for(5)
        stream.pause_reading()
        payload = b"\xab" * UNIT
        sent = 0
        peak_buffered = 0

        async def writer() -> None:
            nonlocal sent, peak_buffered
            for _ in range(256):  # 64 MiB if nothing pushed back
                await client.send([payload])
                sent += 1
                peak_buffered = max(peak_buffered, client.write_buffer_size)

        tracemalloc.start()
        try:
            task = asyncio.ensure_future(writer())
            await asyncio.sleep(1.5)
            assert not task.done(), "the writer never had to wait"
            current, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        received = len(sink.data)
        held = stream._ready_bytes
        # the writer stopped early: what it queued is bounded by its buffer plus one write,
        # and the paused receiver holds no more than its window plus one unit
        assert sent * UNIT <= BUFFER + WINDOW + 2 * UNIT, sent
        assert peak_buffered <= BUFFER + UNIT
        assert received == 5
        assert held <= WINDOW + UNIT
        assert current < 16 << 20, f"{current} bytes allocated while blocked"
        stream.resume_reading()
        await asyncio.wait_for(task, 30)
        await sink.wait_for(5 + 256 * UNIT, timeout=30)
        assert len(sink.data) == 5 + 256 * UNIT
        await client.close()


async def test_peer_vanishing_fails_pending_operations(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        async with UdpRelay(target=("127.0.0.1", port), seed=3) as relay:
            client = await dial(relay.address[1], f"ca={cert}&idle=1&keepalive=0.3")
            sink = Sink()
            client.set_receiver(sink)
            await client.send([b"x"])
            stream, _ = await server.first()
            stream.pause_reading()
            relay.loss = 1.0  # cut the link
            started = time.monotonic()

            async def blocked_writer() -> None:
                while True:
                    await client.send([b"y" * UNIT])

            task = asyncio.ensure_future(blocked_writer())
            async with asyncio.timeout(10):
                await sink.lost.wait()
            elapsed = time.monotonic() - started
            try:
                await asyncio.wait_for(task, 2)
            except ConnectionLost as exc:
                assert "idle timeout" in str(exc)
            else:
                raise AssertionError("the blocked writer was not failed")
            assert isinstance(sink.lost_exc, ConnectionLost)
            assert "idle timeout" in str(sink.lost_exc)
            assert 0.5 < elapsed < 5


async def test_keepalive_holds_an_idle_connection_open(tmp_path) -> None:
    async with serving(tmp_path, "&idle=1&keepalive=0.25") as (server, cert):
        port = server.listener.address.port
        kept = await dial(port, f"ca={cert}&idle=1&keepalive=0.25")
        kept_sink = Sink()
        kept.set_receiver(kept_sink)
        await asyncio.sleep(2.5)  # well past the 1 s idle timeout, with no application data
        assert not kept_sink.lost.is_set()
        assert kept.pings_acknowledged > 0
        await kept.send([b"still alive"])
        await kept.close()


async def test_idle_timeout_without_keepalive(tmp_path) -> None:
    async with serving(tmp_path, "&idle=1&keepalive=0") as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}&idle=1&keepalive=0")
        sink = Sink()
        client.set_receiver(sink)
        started = time.monotonic()
        async with asyncio.timeout(5):
            await sink.lost.wait()
        assert time.monotonic() - started >= 0.8
        assert "idle timeout" in str(sink.lost_exc)


def _serve_demo() -> tuple[subprocess.Popen, str]:
    """`polyrpc serve quic@127.0.0.1:0 --demo` in a subprocess; returns it and its pinned URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyrpc.cli", "serve", "quic@127.0.0.1:0", "--demo"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().startswith("clients: "):
            return proc, line.split()[-1]
    raise AssertionError("polyrpc serve exited early")


async def test_pending_call_fails_soon_after_server_is_killed() -> None:
    proc, url = _serve_demo()
    try:
        async with polyrpc.connect(url) as client:
            assert await client.call("Demo.add", 1, 2) == 3
            pending = asyncio.ensure_future(client.call("Demo.sleep", 60))
            await asyncio.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = time.monotonic()
            with pytest.raises(ConnectionLost, match="port is closed"):
                await asyncio.wait_for(pending, 20)
            took = time.monotonic() - killed
            print(f"pending call failed {took:.2f}s after kill -9 of the server")
            assert took < 3.0
    finally:
        proc.kill()
        proc.wait()


CLIENT = """
import asyncio, sys
import polyrpc

async def main():
    async with polyrpc.connect(sys.argv[1]) as client:
        await client.call("Waiter.wait")

asyncio.run(main())
"""


class Waiter:
    """A handler that records when it starts and when it is cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled_at: float | None = None

    async def wait(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            raise


async def test_server_notices_a_killed_client_soon(tmp_path) -> None:
    cert, key = self_signed_certificate(tmp_path, ["localhost", "127.0.0.1"])
    waiter = Waiter()
    async with polyrpc.serve(f"quic@127.0.0.1:0?cert={cert}&key={key}", waiter) as server:
        url = f"{server.urls[0]}?ca={cert}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            url,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            await asyncio.wait_for(waiter.started.wait(), 20)
            proc.kill()
            await proc.wait()
            killed = time.monotonic()
            async with asyncio.timeout(20):
                while waiter.cancelled_at is None:
                    await asyncio.sleep(0.05)
            took = waiter.cancelled_at - killed
            print(f"server cancelled the handler {took:.2f}s after kill -9 of the client")
            assert took < 3.0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_large_unit_is_handed_to_aioquic_in_chunks(tmp_path) -> None:
    """A 32 MiB unordered write is not copied whole into aioquic's send buffer."""
    payload = os.urandom(32 << 20)
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        client.write([b"hello"], ordered=False)
        _, sink = await server.first()
        await sink.wait_for(5)
        client.write([payload], ordered=False)
        largest = unsent = 0
        async with asyncio.timeout(60):
            while len(sink.data) < 5 + len(payload):
                for quic_stream in client.connection._streams.values():
                    sender = quic_stream.sender
                    largest = max(largest, len(sender._buffer))
                    unsent = max(unsent, sender._buffer_stop - sender.highest_offset)
                await asyncio.sleep(0.002)
        assert bytes(sink.data[5:]) == payload
        print(
            f"aioquic held at most {largest / 2**20:.1f} MiB of the 32 MiB unit, "
            f"{unsent / 2**20:.1f} MiB of it unsent"
        )
        # unacknowledged data is bounded by the 16 MiB flow-control window; what is handed
        # over unsent by FEED_AHEAD plus at most FEED_WINDOW_CAP of the congestion window
        # (the whole 32 MiB before; then the whole window, which grew past 16 MiB)
        assert largest < 24 << 20
        assert unsent <= FEED_AHEAD + FEED_WINDOW_CAP
        await client.close()


def test_an_endpoint_that_cannot_send_cannot_be_made():
    """Driver is an abstract base: an endpoint missing send (or a routing hook) fails when it
    is made, not at its first datagram."""

    class Silent(Driver):
        def cid_issued(self, cid, stream):
            pass

        def cid_retired(self, cid):
            pass

        def finished(self, stream):
            pass

        def established(self, stream):
            pass

    with pytest.raises(TypeError, match="send"):
        Silent()
