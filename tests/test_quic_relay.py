"""quic through an impairing UDP relay: bulk arrives intact, and a loss delays only its own unit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import struct
import time

from quic_helpers import dial, serving

import polyrpc
from polyrpc.testing.udp_relay import UdpRelay
from polyrpc.transports._shared.certs import self_signed_certificate


async def test_4mib_through_loss_reorder_duplication(tmp_path) -> None:
    payload = hashlib.sha256(b"seed").digest() * (4 << 15)  # 4 MiB, not a repeating byte
    async with serving(tmp_path) as (server, cert):
        target = ("127.0.0.1", server.listener.address.port)
        async with UdpRelay(
            target=target, loss=0.03, reorder=0.05, duplicate=0.03, delay=0.001, seed=1
        ) as relay:
            client = await dial(relay.address[1], f"ca={cert}&timeout=10")
            for i in range(0, len(payload), 1 << 20):
                await client.send([payload[i : i + (1 << 20)]])
            _, sink = await server.first()
            await sink.wait_for(len(payload), timeout=60)
            assert hashlib.sha256(sink.data).digest() == hashlib.sha256(payload).digest()
            await client.close()
        stats = relay.stats
        assert stats["up_dropped"] > 0 and stats["up_duplicated"] > 0
        assert stats["up_reordered"] > 0 and stats["down_dropped"] > 0


async def _arrival_order(tmp_path, ordered: bool) -> list[int]:
    """Send 300 numbered units through a lossy relay; return the order they arrived in."""
    async with serving(tmp_path) as (server, cert):
        target = ("127.0.0.1", server.listener.address.port)
        async with UdpRelay(target=target, loss=0.05, delay=0.002, seed=7) as relay:
            client = await dial(relay.address[1], f"ca={cert}&timeout=10")
            for i in range(300):
                client.write([struct.pack("!I", i) + b"." * 400], ordered=ordered)
                if i % 20 == 19:
                    await asyncio.sleep(0.002)  # spread over many packets and round trips
            _, sink = await server.first()
            await sink.wait_for(300 * 404, timeout=30)
            await client.close()
    assert len(sink.data) == 300 * 404
    return [struct.unpack_from("!I", sink.data, k)[0] for k in range(0, len(sink.data), 404)]


async def test_a_lost_packet_delays_only_its_own_unit(tmp_path) -> None:
    # unordered units each ride their own QUIC stream: when a packet is lost, the units
    # sent after it are delivered without waiting for the retransmission
    unordered = await _arrival_order(tmp_path / "a", ordered=False)
    assert sorted(unordered) == list(range(300))
    overtaken = sum(1 for a, b in itertools.pairwise(unordered) if a > b)
    assert overtaken > 0, "no unit ever overtook a delayed one"
    # the ordered channel is one QUIC stream: everything waits (head-of-line blocking)
    ordered = await _arrival_order(tmp_path / "b", ordered=True)
    assert ordered == list(range(300))


async def test_session_echo_through_lossy_relay(tmp_path) -> None:
    """The message API over quic through loss and reordering: big and small calls both ways."""
    cert, key = self_signed_certificate(tmp_path, ["localhost", "127.0.0.1"])
    listener = await polyrpc.listen(
        f"quic@127.0.0.1:0?cert={cert}&key={key}", on_request=lambda m: m
    )
    try:
        port = int(listener.url.rsplit(":", 1)[1])
        async with UdpRelay(
            target=("127.0.0.1", port), loss=0.03, reorder=0.03, duplicate=0.01, seed=5
        ) as relay:
            conn = await polyrpc.dial(f"quic@127.0.0.1:{relay.address[1]}?ca={cert}")
            big = hashlib.sha256(b"big").digest() * (1 << 17)  # 4 MiB
            small = [conn.request(i.to_bytes(4, "big") * 100, timeout=30) for i in range(200)]
            results = await asyncio.gather(conn.request(big, timeout=60), *small)
            assert results[0] == big
            assert results[1:] == [i.to_bytes(4, "big") * 100 for i in range(200)]
            await conn.close()
    finally:
        await listener.close()


SMALL_UNIT = b"s" * 100
"""The small unit written next to the bulk (the bulk is random bytes: never equal to it)."""


class _Arrivals:
    """A receiver noting when the small unit and the end of the big one arrive."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.got = 0
        self.small_at: float | None = None
        self.done = asyncio.Event()
        self.done_at = 0.0

    def data_received(self, data) -> None:
        self.got += len(data)
        # by content: the big unit is delivered in stream-frame pieces, and a piece of it
        # may be 100 bytes long too (it once set small_at as the big one was delivered)
        if self.small_at is None and data == SMALL_UNIT:
            self.small_at = time.perf_counter()
        if self.got >= self.total:
            self.done_at = time.perf_counter()
            self.done.set()

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc) -> None:
        pass


async def _small_next_to_bulk(tmp_path, relay_options: dict | None) -> tuple[float, float]:
    """Write a 32 MiB unit, then a 100-byte one; return (small's delay, big's duration)."""
    big = os.urandom(32 << 20)
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        async with contextlib.AsyncExitStack() as stack:
            if relay_options is not None:
                relay = await stack.enter_async_context(
                    UdpRelay(target=("127.0.0.1", port), **relay_options)
                )
                port = relay.address[1]
            client = await dial(port, f"ca={cert}&timeout=10")
            client.write([b"warm"])
            stream, sink = await server.first()
            await sink.wait_for(4)
            arrivals = _Arrivals(len(big) + len(SMALL_UNIT))
            stream.set_receiver(arrivals)
            started = time.perf_counter()
            client.write([big], ordered=False)
            await asyncio.sleep(0.05)
            small_sent = time.perf_counter()
            client.write([SMALL_UNIT], ordered=False)
            await asyncio.wait_for(arrivals.done.wait(), 120)
            client.abort()
    assert arrivals.small_at is not None
    return arrivals.small_at - small_sent, arrivals.done_at - started


async def test_small_unit_is_not_stuck_behind_bulk_on_loopback(tmp_path) -> None:
    small, big = await _small_next_to_bulk(tmp_path, None)
    print(f"loopback: small unit {small * 1e3:.1f} ms, 32 MiB unit {big * 1e3:.0f} ms")
    assert small < 0.25 * big


async def test_small_unit_is_not_stuck_behind_bulk_through_a_slow_link(tmp_path) -> None:
    # 50 Mbit/s + 5 ms: the 32 MiB unit needs > 5 s; the small one waits for the link's queue
    small, big = await _small_next_to_bulk(tmp_path, {"rate": 50e6, "delay": 0.005})
    print(f"relay: small unit {small * 1e3:.1f} ms, 32 MiB unit {big * 1e3:.0f} ms")
    assert big > 4.0
    assert small < 0.15 * big


class _BulkAndSmall:
    async def size(self, data: bytes) -> int:
        return len(data)

    async def mul(self, a: int, b: int) -> int:
        return a * b


async def test_a_small_call_next_to_a_bulk_call_through_a_slow_link(tmp_path) -> None:
    """At the call level (session and RPC included): through 50 Mbit/s + 5 ms, a small call
    made while a 32 MiB call is being sent takes a few round trips, not the bulk's time."""
    cert, key = self_signed_certificate(tmp_path, ["localhost", "127.0.0.1"])
    async with polyrpc.serve(f"quic@127.0.0.1:0?cert={cert}&key={key}", _BulkAndSmall()) as srv:
        port = int(srv.urls[0].rsplit(":", 1)[1])
        relay_options = {"rate": 50e6, "delay": 0.005}
        async with UdpRelay(target=("127.0.0.1", port), **relay_options) as relay:
            url = f"quic@127.0.0.1:{relay.address[1]}?ca={cert}"
            async with polyrpc.connect(url) as client:
                idle_started = time.perf_counter()
                assert await client.call("_BulkAndSmall.mul", 2, 3) == 6
                idle = time.perf_counter() - idle_started
                started = time.perf_counter()
                bulk = asyncio.ensure_future(
                    client.call("_BulkAndSmall.size", b"b" * (32 << 20), timeout=120)
                )
                await asyncio.sleep(0.05)
                small_started = time.perf_counter()
                assert await client.call("_BulkAndSmall.mul", 6, 7, timeout=60) == 42
                small = time.perf_counter() - small_started
                assert await bulk == 32 << 20
                elapsed = time.perf_counter() - started
    print(
        f"relay: idle call {idle * 1e3:.0f} ms, small call {small * 1e3:.0f} ms, bulk {elapsed:.2f} s"
    )
    assert elapsed > 4.0
    assert small < 0.15 * elapsed
