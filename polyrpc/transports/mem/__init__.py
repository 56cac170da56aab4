"""``mem@name``: an in-process transport for tests, with real backpressure and close semantics."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ...errors import ConnectFailed, ConnectionLost
from ...stream.address import NAME, Address
from ...stream.trait import Buffer, HalfClose, Listener, Stream, StreamHandler
from ...stream.transport import Transport

_EOF = object()
_listeners: dict[str, MemoryListener] = {}
_names = itertools.count(1)
CLOSE_TIMEOUT = 10.0


class MemoryStream(Stream, HalfClose):
    """One end of an in-process pipe. Bytes sit in the writer's queue until the reader takes them."""

    transport_name = "mem"

    def __init__(self, name: str) -> None:
        super().__init__({"peer": name, "local": name})
        self.peer: MemoryStream | None = None
        self._queue: deque[object] = deque()
        self._queued = 0
        self._paused = False
        self._flush_scheduled = False
        self._done: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand queued bytes to the peer while it is reading."""
        self._flush_scheduled = False
        peer = self.peer
        if peer is None or peer._lost is not None:
            return
        while self._queue and not peer._paused:
            item = self._queue.popleft()
            if item is _EOF:
                peer.receiver.eof_received()
                if self._closed:
                    self._finish(None)
                continue
            assert isinstance(item, bytes)
            self._queued -= len(item)
            peer.receiver.data_received(item)
        self._update_write_pressure()

    def _finish(self, exc: Exception | None) -> None:
        """Both ends are gone: each side learns it, the peer with ConnectionLost if ``exc``."""
        peer, self.peer = self.peer, None
        self._connection_lost(None)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if peer is not None:
            peer.peer = None
            peer._connection_lost(exc)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self.peer is not None:
                self.peer._schedule_flush()

    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        self._check_writable()
        data = b"".join(buffers)
        if not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._update_write_pressure()
        self._schedule_flush()

    @property
    def write_buffer_size(self) -> int:
        return self._queued

    def write_eof(self) -> None:
        self._check_writable()
        self._queue.append(_EOF)
        self._schedule_flush()

    async def close(self) -> None:
        if self._lost is not None:
            return
        if not self._closed:
            self._closed = True
            self._queue.append(_EOF)
            self._schedule_flush()
        if self._done is None:
            self._done = self._loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._done), CLOSE_TIMEOUT)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self._lost is not None:
            return
        self._closed = True
        self._queue.clear()
        self._queued = 0
        self._finish(ConnectionLost("mem connection reset by peer"))


class MemoryListener(Listener):
    def __init__(self, address: Address, on_stream: StreamHandler) -> None:
        super().__init__(address)
        self.on_stream = on_stream

    async def close(self) -> None:
        if _listeners.get(self.address.target) is self:
            del _listeners[self.address.target]


class MemoryTransport(Transport):
    """In-process streams between tasks of one event loop; for tests and examples."""

    scheme = "mem"
    description = "in-process (tests)"
    address_kind = NAME

    async def dial(self, address: Address) -> MemoryStream:
        listener = _listeners.get(address.target)
        if listener is None:
            raise ConnectFailed(f"could not connect to {address}: nothing is listening there")
        client, server = MemoryStream(address.target), MemoryStream(address.target)
        client.peer, server.peer = server, client
        listener.on_stream(server)
        await asyncio.sleep(0)
        return client

    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        name = address.target
        if name in ("0", "*"):
            name = f"auto-{next(_names)}"
            address = Address(address.scheme, target=name, kind=NAME)
        if name in _listeners:
            raise ConnectFailed(f"could not listen on {address}: the name is in use")
        listener = MemoryListener(address, on_stream)
        _listeners[name] = listener
        return listener

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        return "mem@0", {}
