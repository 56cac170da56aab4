"""Shared pieces of the quic tests: a recording receiver and a connected client/server pair."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from polyrpc.stream.trait import Buffer
from polyrpc.transports._shared.certs import self_signed_certificate
from polyrpc.transports.quic import QuicListener, QuicStream, QuicTransport

TRANSPORT = QuicTransport()


class Sink:
    """A StreamReceiver that records everything (units are recorded as they arrive)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None
        self.changed = asyncio.Event()

    def data_received(self, data: Buffer) -> None:
        self.data += data
        self.chunks.append(bytes(data))
        self.changed.set()

    def eof_received(self) -> None:
        self.eof.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()

    async def wait_for(self, size: int, timeout: float = 10.0) -> None:
        """Wait until at least ``size`` bytes arrived."""
        async with asyncio.timeout(timeout):
            while len(self.data) < size:
                self.changed.clear()
                await self.changed.wait()


class Server:
    """A listening quic server that records its accepted streams."""

    def __init__(self) -> None:
        self.listener: QuicListener | None = None
        self.streams: list[tuple[QuicStream, Sink]] = []
        self.accepted = asyncio.Event()

    def on_stream(self, stream: QuicStream) -> None:
        sink = Sink()
        stream.set_receiver(sink)
        self.streams.append((stream, sink))
        self.accepted.set()

    async def first(self) -> tuple[QuicStream, Sink]:
        """The first accepted stream."""
        async with asyncio.timeout(5):
            await self.accepted.wait()
        return self.streams[0]


def certificate(tmp_path: Path, names: list[str] | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` (default localhost/127.0.0.1)."""
    return self_signed_certificate(tmp_path, names or ["localhost", "127.0.0.1"])


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, options: str = "") -> AsyncIterator[tuple[Server, Path]]:
    """A server on 127.0.0.1 with a fresh certificate; yields (server, cert path)."""
    cert, key = certificate(tmp_path / "server")
    server = Server()
    url = f"quic@127.0.0.1:0?cert={cert}&key={key}{options}"
    server.listener = await TRANSPORT.listen(TRANSPORT.parse(url), server.on_stream)
    try:
        yield server, cert
    finally:
        for stream, _ in server.streams:
            stream.abort()
        await server.listener.close()


async def dial(port: int, options: str, host: str = "127.0.0.1") -> QuicStream:
    """Dial quic@host:port?options."""
    return await TRANSPORT.dial(TRANSPORT.parse(f"quic@{host}:{port}?{options}"))


async def until(condition: Callable[[], bool], seconds: float, step: float = 0.02) -> None:
    """Wait until ``condition()`` holds, failing with TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(step)
