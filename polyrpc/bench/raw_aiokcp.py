"""Benchmark reference row ``raw-aiokcp``: a length-prefixed echo over plain aiokcp.

aiokcp wraps the reference ikcp.c with a Python update loop. It runs here in its
fastest nodelay mode (nodelay, 10 ms interval, fast resend after 2 acks, no
congestion window, windows as large as polyrpc's kcp default) and every write is
followed by an explicit ``flush()`` so replies do not wait for the next tick.
Acknowledgements still go out on aiokcp's own update tick: that is how it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .targets import EchoClient, Target

LENGTH = struct.Struct("!I")
WRITE_CHUNK = 64 << 10
KCP_SETTINGS = {
    "max_transmission": 1400,
    "no_delay": True,
    "update_interval": 10,
    "resend_count": 2,
    "no_congestion_control": True,
    "send_window_size": 512,
    "receive_window_size": 512,
    "stream": 1,
}


class _Framer:
    """Splits a byte stream into 4-byte-length-prefixed frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            (size,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 4 + size:
                break
            frames.append(bytes(self.buffer[4 : 4 + size]))
            del self.buffer[: 4 + size]
        return frames


def _write_flushed(transport: Any, payload: bytes) -> None:
    """Queue one frame and push it out now instead of on the next update tick."""
    frame = LENGTH.pack(len(payload)) + payload
    for start in range(0, len(frame), WRITE_CHUNK):  # ikcp takes < 128 segments per send
        transport.write(frame[start : start + WRITE_CHUNK])
    if transport.kcp is not None:
        transport.kcp.flush()


class _EchoServerProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.framer = _Framer()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            _write_flushed(self.transport, frame)


class _EchoClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.framer = _Framer()
        self.waiters: deque[asyncio.Future[bytes]] = deque()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("aiokcp connection closed"))


class AiokcpEchoClient(EchoClient):
    """Echo over one aiokcp connection; replies come back in order."""

    def __init__(self, transport: Any, protocol: _EchoClientProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    async def echo(self, payload: bytes) -> bytes:
        waiter = asyncio.get_running_loop().create_future()
        self.protocol.waiters.append(waiter)
        _write_flushed(self.transport, payload)
        return await waiter

    async def close(self) -> None:
        self.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.wait_closed(), 5)


class RawAiokcpTarget(Target):
    """The reference row: aiokcp (ikcp.c + Python update loop), nodelay, flush per write."""

    name = "raw-aiokcp"
    kind = "reference"

    def unavailable_reason(self) -> str | None:
        try:
            import aiokcp  # noqa: F401
        except ImportError as exc:
            return f"aiokcp is not installed ({exc}); pip install aiokcp"
        return None

    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        from aiokcp import create_server

        server = await create_server(
            _EchoServerProtocol, "127.0.0.1", 0, kcp_kwargs=dict(KCP_SETTINGS)
        )
        await server.start_serving()
        host, port = server._inner_protocol._transport.get_extra_info("sockname")[:2]

        async def stop() -> None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

        return f"{host}:{port}", stop

    async def connect(self, info: str) -> EchoClient:
        from aiokcp import create_connection

        host, _, port = info.rpartition(":")
        transport, protocol = await create_connection(
            _EchoClientProtocol, host, int(port), kcp_kwargs=dict(KCP_SETTINGS)
        )
        return AiokcpEchoClient(transport, protocol)
