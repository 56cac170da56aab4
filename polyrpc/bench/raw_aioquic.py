"""Reference row ``raw-aioquic``: an echo written by hand on aioquic's own asyncio stream API.

One bidirectional QUIC stream per connection, each message a 4-byte big-endian
length plus payload, 16 MiB flow-control windows, aioquic's default socket glue
(aioquic's ``QuicServer``, as ``aioquic.asyncio.serve`` starts it, and ``connect``). This
is what a user gets from aioquic without polyrpc; the quic transport is measured against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration

from ..transports._shared.certs import self_signed_certificate
from .targets import EchoClient, Target

ALPN = "raw-echo"
WINDOW = 16 << 20
_LENGTH = struct.Struct("!I")


def _configuration(is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client, alpn_protocols=[ALPN], max_data=WINDOW, max_stream_data=WINDOW
    )


async def _echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server side: echo each length-prefixed message back on the same stream."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            header = await reader.readexactly(4)
            body = await reader.readexactly(_LENGTH.unpack(header)[0])
            writer.write(header + body)


class RawAioquicClient(EchoClient):
    """Client side: writes requests on one stream, matches replies in FIFO order."""

    def __init__(
        self, manager: contextlib.AbstractAsyncContextManager, protocol: QuicConnectionProtocol
    ):
        self._manager = manager
        self._protocol = protocol
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the one bidirectional stream and start reading replies."""
        self._reader, self._writer = await self._protocol.create_stream()
        self._task = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(4)
                body = await self._reader.readexactly(_LENGTH.unpack(header)[0])
                self._waiting.popleft().set_result(body)
        except Exception as exc:
            while self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(ConnectionError(f"raw-aioquic stream ended: {exc!r}"))

    async def echo(self, payload: bytes) -> bytes:
        assert self._writer is not None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._manager.__aexit__(None, None, None)


class RawAioquic(Target):
    """aioquic by hand: one stream, length-prefixed echo, 16 MiB windows."""

    name = "raw-aioquic"
    kind = "reference"
    network = "udp"

    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        cert, key = self_signed_certificate(Path(workdir), ["localhost", "127.0.0.1"])
        configuration = _configuration(is_client=False)
        configuration.load_cert_chain(cert, key)
        # what aioquic.asyncio.serve does, keeping the socket's transport: its port is public
        transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicServer(
                configuration=configuration,
                stream_handler=lambda r, w: asyncio.ensure_future(_echo_stream(r, w)),  # type: ignore[arg-type]  # result unused
            ),
            local_addr=("127.0.0.1", 0),
        )
        port = transport.get_extra_info("sockname")[1]

        async def stop() -> None:
            server.close()

        return f"127.0.0.1:{port}:{cert}", stop

    async def connect(self, info: str) -> EchoClient:
        host, port, cert = info.split(":", 2)
        configuration = _configuration(is_client=True)
        configuration.verify_mode = ssl.CERT_REQUIRED
        configuration.load_verify_locations(cafile=cert)
        manager = connect(host, int(port), configuration=configuration)
        protocol = await manager.__aenter__()
        client = RawAioquicClient(manager, protocol)
        await client.start()
        return client
