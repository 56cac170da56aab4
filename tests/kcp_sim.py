"""A deterministic simulated link for sans-socket KCP tests (our engine and reference ones).

Each endpoint adapts one KCP implementation to: send(bytes), input(datagram, now),
tick(now) -> datagrams to put on the wire, and received() -> bytes or messages.
The link delivers datagrams after a fixed one-way delay, dropping a seeded share.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from polyrpc.transports.kcp.engine import KcpEngine


class OurEndpoint:
    """polyrpc's engine, flushed exactly when its own check() says so (no fixed tick)."""

    def __init__(self, engine: KcpEngine) -> None:
        self.engine = engine
        self.dirty = True

    def send(self, data: bytes) -> None:
        self.engine.send(data)
        self.dirty = True

    def input(self, datagram: bytes, now: int) -> None:
        self.engine.input(datagram, now)
        self.dirty = True

    def tick(self, now: int) -> list[bytes]:
        due = self.engine.check(now)
        if self.dirty or (due is not None and due <= now):
            self.dirty = False
            self.engine.flush(now)
        return self.engine.take_output()

    def received(self) -> list[bytes]:
        out = []
        while (item := self.engine.recv()) is not None:
            out.append(item)
        return out


class RefEndpoint:
    """A reference KCP (ikcp.c inside the aiokcp or kcp PyPI packages), updated every ms."""

    def __init__(self, package: str, conv: int, **kwargs: int) -> None:
        self.out: list[bytes] = []
        if package == "aiokcp":
            from aiokcp.kcp import KCP

            self.kcp = KCP(conv, **kwargs)
            self.kcp.set_output_handler(lambda _k, d: self.out.append(bytes(d)))
            self._available = lambda: self.kcp.packet_available
        else:
            from kcp import KCP

            self.kcp = KCP(conv, **kwargs)
            self.kcp.include_outbound_handler(lambda _k, d: self.out.append(bytes(d)))
            self._available = lambda: self.kcp.next_packet_available

    def send(self, data: bytes) -> None:
        self.kcp.enqueue(data)

    def input(self, datagram: bytes, now: int) -> None:
        self.kcp.receive(datagram)

    def tick(self, now: int) -> list[bytes]:
        self.kcp.update(now)
        out, self.out = self.out, []
        return out

    def received(self) -> list[bytes]:
        out = []
        while self._available():
            out.append(bytes(self.kcp.get_received()))
        return out


class Link:
    """Two endpoints joined by a simulated network with delay and seeded loss."""

    def __init__(
        self,
        a,
        b,
        *,
        delay: int = 5,
        loss: float = 0.0,
        seed: int = 1,
        start: int = 1000,
        drop: Callable[[str, bytes], bool] | None = None,
    ) -> None:
        self.a, self.b = a, b
        self.delay = delay
        self.loss = loss
        self.rng = random.Random(seed)
        self.now = start
        self.queue: list[tuple[int, int, str, bytes]] = []
        self.seq = 0
        self.drop = drop
        self.got = {"a": [], "b": []}
        self.wire = {"a": [], "b": []}

    def _emit(self, side: str, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.wire[side].append(d)
            if self.drop is not None and self.drop(side, d):
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            self.seq += 1
            heapq.heappush(self.queue, (self.now + self.delay, self.seq, side, d))

    def step(self) -> None:
        """Advance one millisecond: deliver due datagrams, then let both sides tick."""
        while self.queue and self.queue[0][0] <= self.now:
            _, _, side, d = heapq.heappop(self.queue)
            (self.b if side == "a" else self.a).input(d, self.now)
        self._emit("a", self.a.tick(self.now))
        self._emit("b", self.b.tick(self.now))
        self.got["a"].extend(self.a.received())
        self.got["b"].extend(self.b.received())
        self.now += 1

    def run_until(self, done: Callable[[], bool], limit_ms: int = 120_000) -> int:
        """Step until ``done()``; returns the simulated milliseconds it took."""
        start = self.now
        while not done():
            if self.now - start > limit_ms:
                raise AssertionError(f"not done after {limit_ms} simulated ms")
            self.step()
        return self.now - start
