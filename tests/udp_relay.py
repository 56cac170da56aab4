"""A seeded, lossy UDP relay for fault tests of datagram transports (kcp, quic...).

    async with UdpRelay(target=(host, port), loss=0.1, reorder=0.05, duplicate=0.05,
                        delay=0.002, seed=1) as relay:
        dial(relay.address)

Every client address gets its own upstream socket, so the target sees one peer per
client. Each direction draws from its own ``random.Random(seed)`` stream, so the
fault applied to the n-th datagram of a direction is the same on every run.
``loss``, ``reorder`` and ``duplicate`` are probabilities; ``delay`` is a one-way
delay in seconds; a reordered datagram is held ``reorder_delay`` seconds longer so
later ones overtake it. The attributes may be changed while the relay runs (e.g.
``relay.loss = 1.0`` to cut the link).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

UP, DOWN = "up", "down"


class _Side(asyncio.DatagramProtocol):
    """One socket of the relay; hands every datagram to a callback."""

    def __init__(self, on_datagram) -> None:
        self.on_datagram = on_datagram
        self.transport: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (the target is gone) are just more loss."""


class UdpRelay:
    """Forwards UDP datagrams between clients and ``target``, injecting seeded faults."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        loss: float = 0.0,
        reorder: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        reorder_delay: float = 0.005,
        seed: int = 1,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.loss = loss
        self.reorder = reorder
        self.duplicate = duplicate
        self.delay = delay
        self.reorder_delay = reorder_delay
        self.host = host
        self.address: tuple[str, int] = (host, 0)
        self.stats: Counter[str] = Counter()
        self._rng = {UP: random.Random(seed), DOWN: random.Random(seed + 1)}
        self._front: _Side | None = None
        self._upstreams: dict[Any, _Side] = {}
        self._closed = False

    async def __aenter__(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        _, front = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=(self.host, 0)
        )
        self._front = front
        assert front.transport is not None
        sockname = front.transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop relaying and close every socket."""
        self._closed = True  # datagrams still held back are dropped when they come due
        for side in [self._front, *self._upstreams.values()]:
            if side is not None and side.transport is not None:
                side.transport.close()
        self._upstreams.clear()

    @property
    def url_hostport(self) -> str:
        """``host:port`` of the relay, for building a dial URL."""
        return f"{self.address[0]}:{self.address[1]}"

    def _from_client(self, data: bytes, client: Any) -> None:
        upstream = self._upstreams.get(client)
        if upstream is None:
            upstream = _Side(lambda d, _a, c=client: self._from_target(d, c))
            self._upstreams[client] = upstream
            upstream.pending.append(data)
            asyncio.get_running_loop().create_task(self._connect_upstream(upstream))
            return
        if upstream.transport is None:
            upstream.pending.append(data)
            return
        self._forward(UP, data, lambda d, u=upstream: u.transport.sendto(d))

    async def _connect_upstream(self, upstream: _Side) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: upstream, remote_addr=self.target)
        pending, upstream.pending = upstream.pending, []
        for data in pending:
            self._forward(UP, data, lambda d, u=upstream: u.transport.sendto(d))

    def _from_target(self, data: bytes, client: Any) -> None:
        front = self._front
        if front is None or front.transport is None:
            return
        self._forward(DOWN, data, lambda d, c=client: front.transport.sendto(d, c))

    def _forward(self, direction: str, data: bytes, send) -> None:
        if self._closed:
            return
        rng = self._rng[direction]
        self.stats[f"{direction}_in"] += 1
        if rng.random() < self.loss:
            self.stats[f"{direction}_dropped"] += 1
            return
        copies = 1
        if rng.random() < self.duplicate:
            copies = 2
            self.stats[f"{direction}_duplicated"] += 1
        for _ in range(copies):
            wait = self.delay
            if rng.random() < self.reorder:
                wait += self.reorder_delay
                self.stats[f"{direction}_reordered"] += 1
            if wait <= 0:
                self._send(send, data)
            else:
                asyncio.get_running_loop().call_later(wait, self._send, send, data)

    def _send(self, send, data: bytes) -> None:
        if self._closed:
            return
        self.stats["forwarded"] += 1
        send(data)
