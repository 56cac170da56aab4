"""Helpers for the kcp transport tests: receivers that record what a stream delivers."""

from __future__ import annotations

import asyncio
import hashlib

from polyrpc.stream.registry import registry
from polyrpc.stream.trait import Stream


class Collector:
    """A StreamReceiver that keeps the bytes, EOF and the final error, with waitable events."""

    def __init__(self, stream: Stream | None = None) -> None:
        self.stream = stream
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None
        self.changed = asyncio.Event()
        self.sha = hashlib.sha256()
        self.keep = True

    def data_received(self, data) -> None:
        if self.keep:
            self.data += data
        self.sha.update(data)
        self.count = getattr(self, "count", 0) + len(data)
        self.changed.set()

    def eof_received(self) -> None:
        self.eof.set()
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()
        self.changed.set()

    @property
    def received(self) -> int:
        return getattr(self, "count", 0)

    async def wait_bytes(self, n: int, timeout: float = 30.0) -> None:
        async def loop() -> None:
            while self.received < n:
                self.changed.clear()
                if self.lost.is_set():
                    raise AssertionError(f"lost after {self.received}/{n} bytes: {self.lost_exc}")
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


class Echo(Collector):
    """Writes back everything it receives."""

    def data_received(self, data) -> None:
        super().data_received(data)
        self.stream.write([bytes(data)])


class Server:
    """A kcp listener whose accepted streams get a receiver made by ``factory``."""

    def __init__(self, factory=Collector, keep: bool = True) -> None:
        self.factory = factory
        self.keep = keep
        self.count = 0
        self.streams: list[Stream] = []
        self.receivers: list[Collector] = []
        self.accepted = asyncio.Event()

    def on_stream(self, stream: Stream) -> None:
        receiver = self.factory(stream)
        stream.set_receiver(receiver)
        self.count += 1
        if self.keep:
            self.streams.append(stream)
            self.receivers.append(receiver)
        self.accepted.set()

    async def start(self, url: str = "kcp@127.0.0.1:0?mode=fast3"):
        transport, address = registry.resolve(url)
        self.listener = await transport.listen(address, self.on_stream)
        return self.listener


async def dial(url: str) -> tuple[Stream, Collector]:
    transport, address = registry.resolve(url)
    stream = await transport.dial(address)
    receiver = Collector(stream)
    stream.set_receiver(receiver)
    return stream, receiver
