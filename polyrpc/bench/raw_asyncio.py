"""The ``raw-asyncio`` reference row: a hand-written asyncio.Protocol echo, 4-byte length prefix.

This is the floor a user could write without any library: one write per message,
a bytearray receive buffer, a FIFO of futures on the client. For the stream workload
the prefix's top bit marks a one-way message, which the server counts instead of
echoing; an empty one asks for the count.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from .targets import EchoClient, Target

_LEN = struct.Struct("!I")
_COUNT = struct.Struct("!Q")
ONE_WAY = 1 << 31


class _Framer(asyncio.Protocol):
    """Splits the byte stream into length-prefixed messages."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (prefix,) = _LEN.unpack_from(self.buffer)
            size = prefix & ~ONE_WAY
            if len(self.buffer) < 4 + size:
                break
            message = bytes(self.buffer[4 : 4 + size])
            del self.buffer[: 4 + size]
            if prefix & ONE_WAY:
                self.one_way_received(message)
            else:
                self.message_received(message)  # type: ignore[attr-defined]

    def one_way_received(self, message: bytes) -> None:
        raise ConnectionError("unexpected one-way message")


class _EchoServer(_Framer):
    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def message_received(self, message: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_LEN.pack(len(message)) + message)

    def one_way_received(self, message: bytes) -> None:
        if message:
            self.taken += len(message)
        else:
            self.message_received(_COUNT.pack(self.taken))


class _EchoClientProtocol(_Framer):
    def __init__(self) -> None:
        super().__init__()
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.writable: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def message_received(self, message: bytes) -> None:
        self.waiting.popleft().set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            self.waiting.popleft().set_exception(ConnectionError("connection lost"))
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ConnectionError("connection lost"))


class _RawClient(EchoClient):
    def __init__(self, protocol: _EchoClientProtocol) -> None:
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()

    async def echo(self, payload: bytes) -> bytes:
        future = self.loop.create_future()
        self.protocol.waiting.append(future)
        assert self.protocol.transport is not None
        self.protocol.transport.write(_LEN.pack(len(payload)) + payload)
        return await future

    async def push(self, payload: bytes) -> None:
        assert self.protocol.transport is not None
        self.protocol.transport.write(_LEN.pack(ONE_WAY | len(payload)) + payload)
        if self.protocol.writable is not None:
            await self.protocol.writable

    async def received(self) -> int:
        future = self.loop.create_future()
        self.protocol.waiting.append(future)
        await self.push(b"")
        return _COUNT.unpack(await future)[0]

    async def close(self) -> None:
        assert self.protocol.transport is not None
        self.protocol.transport.close()


class RawAsyncio(Target):
    """Plain asyncio over TCP loopback."""

    name = "raw-asyncio"
    kind = "reference"
    one_way = True

    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        server = await asyncio.get_running_loop().create_server(_EchoServer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def stop() -> None:
            server.close()

        return f"127.0.0.1:{port}", stop

    async def connect(self, info: str) -> EchoClient:
        host, port = info.rsplit(":", 1)
        _, protocol = await asyncio.get_running_loop().create_connection(
            _EchoClientProtocol, host, int(port)
        )
        return _RawClient(protocol)
