"""A deterministic, seeded, impairing UDP relay for tests: loss, reordering, duplication, delay.

    async with UdpRelay(target=(host, port), loss=0.05, reorder=0.05, duplicate=0.02,
                        delay=0.001, seed=1) as relay:
        dial(f"quic@{relay.address[0]}:{relay.address[1]}")

Each client address seen gets its own upstream socket, so the server sees one
peer per client. Decisions come from one ``random.Random(seed)`` per direction,
so a run's pattern of drops is fixed by the seed (timing still varies).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

Address = tuple[str, int]


@dataclass
class RelayStats:
    """What the relay did, per direction ("up": client to server, "down": back)."""

    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    dropped: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    duplicated: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    reordered: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.callback(data, addr)


class UdpRelay:
    """Forwards datagrams between clients and ``target`` with seeded impairments."""

    def __init__(
        self,
        target: Address,
        *,
        loss: float = 0.0,
        reorder: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        seed: int = 1,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.loss, self.reorder, self.duplicate, self.delay = loss, reorder, duplicate, delay
        self.host = host
        self._random = {"up": random.Random(seed), "down": random.Random(seed + 1)}
        self._front: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Address, asyncio.DatagramTransport] = {}
        self._held: dict[str, tuple[bytes, Any] | None] = {"up": None, "down": None}
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self.stats = RelayStats()
        self.address: Address = ("", 0)
        self.blackhole = False
        """While True every datagram is dropped (simulates a peer vanishing)."""

    async def __aenter__(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self._from_client), local_addr=(self.host, 0)
        )
        self.address = self._front.get_extra_info("sockname")[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
        for transport in self._upstreams.values():
            transport.close()
        if self._front is not None:
            self._front.close()

    def _from_client(self, data: bytes, client: Address) -> None:
        upstream = self._upstreams.get(client)
        if upstream is None:
            task = asyncio.ensure_future(self._open_upstream(client, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._impair("up", data, lambda d: upstream.sendto(d))

    async def _open_upstream(self, client: Address, first: bytes) -> None:
        if client in self._upstreams:
            self._from_client(first, client)
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(lambda d, _a: self._from_server(d, client)),
            remote_addr=self.target,
        )
        self._upstreams[client] = transport
        self._from_client(first, client)

    def _from_server(self, data: bytes, client: Address) -> None:
        front = self._front
        if front is not None:
            self._impair("down", data, lambda d: front.sendto(d, client))

    def _impair(self, direction: str, data: bytes, send: Any) -> None:
        rng = self._random[direction]
        if self.blackhole or rng.random() < self.loss:
            self.stats.dropped[direction] += 1
            return
        copies = 2 if rng.random() < self.duplicate else 1
        if copies == 2:
            self.stats.duplicated[direction] += 1
        if rng.random() < self.reorder and self._held[direction] is None:
            # hold this one back until the next datagram in this direction has gone out
            self._held[direction] = (data, send)
            self.stats.reordered[direction] += 1
            self._later(0.005, lambda: self._release(direction))
            return
        for _ in range(copies):
            self._emit(direction, data, send)
        self._release(direction)

    def _release(self, direction: str) -> None:
        held, self._held[direction] = self._held[direction], None
        if held is not None:
            self._emit(direction, *held)

    def _emit(self, direction: str, data: bytes, send: Any) -> None:
        self.stats.forwarded[direction] += 1
        if self.delay:
            self._later(self.delay, lambda: send(data))
        else:
            send(data)

    def _later(self, seconds: float, action: Any) -> None:
        loop = asyncio.get_running_loop()

        def run() -> None:
            self._timers.discard(handle)
            action()

        handle = loop.call_later(seconds, run)
        self._timers.add(handle)
