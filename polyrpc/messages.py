"""The message core's public API: whole messages over any transport URL, no RPC.

``dial(url)`` gives a :class:`Connection`; ``listen(url, ...)`` accepts them.
A connection sends one-way messages (``send``/``receive``) and request/reply
pairs (``request`` on one side, ``on_request`` on the other). The RPC layer
uses the same session underneath.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from .errors import ConnectionLost, ConnectTimeout, ProtocolError
from .session.session import BYTES_LIKE, PAUSE_INBOX, Session, SessionConfig
from .stream.registry import registry
from .stream.trait import DISCARD, Listener, Stream
from .wire.codecs import codec_by_name, decode_error_code
from .wire.frames import Frame, Kind, encode_frame

log = logging.getLogger("polyrpc")

_RESPONSE = int(Kind.RESPONSE)
RequestHandler = Callable[[Any], Any]
"""Answers a request: takes the message, returns the reply (or an awaitable of it)."""


class Message:
    """A received one-way message: the decoded ``payload`` and its ``metadata``."""

    __slots__ = ("metadata", "payload")

    def __init__(self, payload: Any, metadata: dict[str, str]) -> None:
        self.payload = payload
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"Message({self.payload!r}, metadata={self.metadata!r})"


class Connection(Session):
    """A polyrpc connection used for plain messages and request/reply."""

    __slots__ = (
        "_handlers",
        "_inbox",
        "_inbox_bytes",
        "_inbox_waiter",
        "on_request_handler",
    )

    def __init__(
        self,
        stream: Stream,
        config: SessionConfig,
        *,
        is_client: bool,
        on_request: RequestHandler | None = None,
    ) -> None:
        # first: Session.__init__ replays what the stream already delivered (maybe its end)
        self.on_request_handler = on_request
        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        super().__init__(stream, config, is_client=is_client)

    # --- sending ---------------------------------------------------------
    async def send(self, message: Any, *, metadata: dict[str, str] | None = None) -> None:
        """Send a one-way message; waits only while the peer or the network is slow."""
        self.send_oneway(message, metadata=metadata)
        if self.byte_stream.writing_paused:
            await self.wait_writable()

    async def request(
        self,
        message: Any,
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Any:
        """Send ``message`` as a request and return the peer's reply."""
        waiting = self.wait_before_request(len(message) if isinstance(message, BYTES_LIKE) else 0)
        if waiting is not None:
            await waiting
        seq, future = self.begin_request(message, "", metadata, timeout)
        # no wait for the stream to drain once written (as in RpcConnection.call)
        try:
            frame = await future
        except BaseException:
            self.abandon_request(seq, future)
            del future  # it holds the error, whose traceback holds this frame: no cycle
            raise
        if frame.kind == _RESPONSE and frame.codec == 0:
            return frame.payload
        return self.result(frame)

    # --- receiving -------------------------------------------------------
    async def receive_message(self) -> Message:
        """The next one-way message with its metadata; ConnectionLost once closed and drained."""
        while not self._inbox:
            if self.is_closed or self._peer_closing:
                raise (
                    self.lost_error()
                    if self.is_closed
                    else ConnectionLost("the peer closed the connection")
                )
            if self._inbox_waiter is None:
                self._inbox_waiter = self.loop.create_future()
            await self._inbox_waiter
        message, size = self._inbox.popleft()
        self._inbox_bytes -= size
        if self._paused & PAUSE_INBOX and self._inbox_bytes <= self.config.max_inbox_bytes // 2:
            self.resume_reading(PAUSE_INBOX)
        return message

    async def receive(self) -> Any:
        """The payload of the next one-way message."""
        return (await self.receive_message()).payload

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.receive()
            except ConnectionLost:
                return

    def _wake_receiver(self) -> None:
        waiter, self._inbox_waiter = self._inbox_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- session hooks ---------------------------------------------------
    def on_oneway(self, frame: Frame) -> None:
        """Queue a one-way message; one whose payload cannot be decoded (too complex, or
        not valid for its codec) is dropped with a warning, as RPC drops such a notification:
        only that message is lost (a seq-0 ERROR would end the peer's connection)."""
        try:
            payload = self.decode(frame)
        except ProtocolError as exc:
            log.warning("one-way message from %s dropped: %s", self.peer, exc)
            return
        size = len(frame.payload)
        self._inbox.append((Message(payload, frame.metadata), size))
        self._inbox_bytes += size
        if self._inbox_bytes > self.config.max_inbox_bytes:
            self.pause_reading(PAUSE_INBOX)
        self._wake_receiver()

    def on_request(self, frame: Frame) -> None:
        handler = self.on_request_handler
        if handler is None:
            super().on_request(frame)
            return
        try:  # a raw payload is bytes already: both decoders hand out bytes
            message = frame.payload if frame.codec == 0 else self.decode(frame)
        except ProtocolError as exc:
            self.respond_error(frame.seq, exc, decode_error_code(exc))
            return
        try:
            reply = handler(message)
        except Exception as exc:
            self.respond_error(frame.seq, exc, "handler_error")
            return
        if hasattr(reply, "__await__"):
            task = self.loop.create_task(self._finish_request(frame.seq, reply))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        else:
            self.respond(frame.seq, reply)

    async def _finish_request(self, seq: int, reply: Awaitable[Any]) -> None:
        try:
            value = await reply
        except Exception as exc:
            self.respond_error(seq, exc, "handler_error")
        else:
            self.respond(seq, value)

    def incoming_tasks(self) -> set[asyncio.Task[None]]:
        return self._handlers

    def on_eof(self) -> None:
        self._wake_receiver()
        super().on_eof()

    def on_goaway(self) -> None:
        self._wake_receiver()

    def on_closed(self, exc: Exception | None) -> None:
        self._wake_receiver()


def make_config(config: SessionConfig | None, **overrides: Any) -> SessionConfig:
    """A SessionConfig from ``config`` with keyword overrides (unknown names are errors)."""
    base = config or SessionConfig()
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return replace(base, **values)
    except TypeError as exc:
        raise TypeError(f"unknown connection option: {exc}") from None


async def open_session(
    url: str,
    factory: Callable[[Stream], Session],
    timeout: float,
) -> Session:
    """Dial ``url``, wrap the stream with ``factory`` and complete the HELLO handshake."""
    transport, address = registry.resolve(url)
    try:
        async with asyncio.timeout(timeout):
            stream = await transport.dial(address)
            session = factory(stream)
            try:
                await session.handshake()
            except BaseException:
                session.abort()
                raise
    except TimeoutError:
        raise ConnectTimeout(f"connecting to {url} timed out after {timeout:g}s") from None
    return session


async def dial(
    url: str,
    *,
    on_request: RequestHandler | None = None,
    timeout: float = 10.0,
    config: SessionConfig | None = None,
    **options: Any,
) -> Connection:
    """Connect to ``url`` and return a message :class:`Connection`.

    ``options`` are :class:`SessionConfig` fields (codec, token, max_in_flight,
    heartbeat_interval, idle_timeout, ...). ``on_request`` answers the peer's requests.
    """
    cfg = make_config(config, **options)
    session = await open_session(
        url, lambda s: Connection(s, cfg, is_client=True, on_request=on_request), timeout
    )
    assert isinstance(session, Connection)
    return session


MAX_HANDSHAKING = 128
"""Default cap on connections still in the handshake (see :class:`HandshakeGate`)."""
REFUSED_LINGER = 2.0
"""How long a connection refused over ``max_handshaking`` may take to flush its ERROR."""


class HandshakeGate:
    """Caps a listening side's connections still in the handshake, the only ones an
    unauthenticated peer can hold: a newcomer over ``limit`` is closed at once with one
    small ERROR frame (``too_many_handshakes``), no session and no HELLO processing.
    Shared by :class:`~polyrpc.rpc.endpoints.Server` and :class:`MessageListener`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("max_handshaking must be at least 1")
        self.limit = limit
        self.handshaking: set[Session] = set()
        """Connections still in the handshake."""
        self._refused: set[asyncio.Task[None]] = set()

    def admit(self, stream: Stream) -> bool:
        """True if ``stream`` may start its handshake; else it is refused and closing."""
        if len(self.handshaking) >= self.limit:
            self.forget_gone()
        if len(self.handshaking) < self.limit:
            return True
        log.warning(
            "refusing %s connection from %s: %d connections are in the handshake (max_handshaking)",
            stream.transport_name,
            stream.get_extra_info("peer"),
            len(self.handshaking),
        )
        stream.set_receiver(DISCARD)
        codec = codec_by_name("msgpack")
        body = {
            "type": "HandshakeError",
            "message": f"the server is busy: {self.limit} connections are already "
            "in the handshake; try again shortly",
            "code": "too_many_handshakes",
        }
        try:
            stream.write(encode_frame(Kind.ERROR, 0, codec.encode(body), codec=codec.id))
        except ConnectionLost:
            stream.abort()
            return False
        task = asyncio.get_running_loop().create_task(self._close_refused(stream))
        self._refused.add(task)
        task.add_done_callback(self._refused.discard)
        return False

    def forget_gone(self) -> None:
        """Stop counting connections already lost: one lost mid-handshake stays in
        ``handshaking`` until its handshake task unwinds, a few loop turns later."""
        self.handshaking.difference_update([s for s in self.handshaking if s.is_closed])

    async def _close_refused(self, stream: Stream) -> None:
        try:
            await asyncio.wait_for(stream.close(), REFUSED_LINGER)
        except (TimeoutError, ConnectionLost):
            stream.abort()

    def handshake(self, session: Session) -> Coroutine[Any, Any, bool]:
        """Count ``session`` as handshaking from now; the coroutine runs its server side of
        the handshake (True if admitted) and stops counting it when that ends."""
        self.handshaking.add(session)
        return self._handshake(session)

    async def _handshake(self, session: Session) -> bool:
        try:
            return await session.accept_handshake()
        finally:
            self.handshaking.discard(session)

    async def close(self) -> None:
        """Abort the connections still in the handshake; wait for the refused ones to go."""
        for session in list(self.handshaking):
            session.abort(ConnectionLost("the server is closing"))
        await asyncio.gather(*self._refused, return_exceptions=True)


ConnectionHandler = Callable[[Connection], Awaitable[None] | None]


class MessageListener:
    """Accepts connections on one URL; iterate it, ``accept()``, or pass a handler to listen()."""

    def __init__(
        self,
        config: SessionConfig,
        handler: ConnectionHandler | None,
        on_request: RequestHandler | None,
        max_handshaking: int = MAX_HANDSHAKING,
    ) -> None:
        self.config = config
        self.handler = handler
        self.on_request = on_request
        self.gate = HandshakeGate(max_handshaking)
        """Caps the connections still in the handshake (``max_handshaking``)."""
        self.listener: Listener | None = None
        self.connections: set[Connection] = set()
        self._accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The URL clients dial (port 0 resolved to the bound port)."""
        assert self.listener is not None
        return self.listener.url

    def _on_stream(self, stream: Stream) -> None:
        if not self.gate.admit(stream):
            return
        connection = Connection(stream, self.config, is_client=False, on_request=self.on_request)
        handshake = self.gate.handshake(connection)
        task = asyncio.get_running_loop().create_task(self._admit(connection, handshake))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, connection: Connection, handshake: Awaitable[bool]) -> None:
        if not await handshake:
            return
        self.connections.add(connection)
        connection._closed.add_done_callback(lambda _: self.connections.discard(connection))
        if self.handler is None:
            self._accepted.put_nowait(connection)
            return
        try:
            result = self.handler(connection)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("connection handler failed for %s", connection.peer)
            connection.abort()

    async def accept(self) -> Connection:
        """The next connection that completed its handshake (without a handler)."""
        return await self._accepted.get()

    def __aiter__(self) -> MessageListener:
        return self

    async def __anext__(self) -> Connection:
        return await self.accept()

    async def close(self, *, connections: bool = True) -> None:
        """Stop listening and, by default, close the accepted connections gracefully."""
        if self.listener is not None:
            await self.listener.close()
        await self.gate.close()
        if connections:
            await asyncio.gather(*(c.close() for c in list(self.connections)))
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> MessageListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def listen(
    url: str,
    handler: ConnectionHandler | None = None,
    *,
    on_request: RequestHandler | None = None,
    max_handshaking: int = MAX_HANDSHAKING,
    config: SessionConfig | None = None,
    **options: Any,
) -> MessageListener:
    """Listen on ``url``; each connection goes to ``handler`` (or to ``accept()``).
    ``max_handshaking`` caps the connections still in the handshake (:class:`HandshakeGate`)."""
    cfg = make_config(config, **options)
    transport, address = registry.resolve(url)
    listener = MessageListener(cfg, handler, on_request, max_handshaking)
    listener.listener = await transport.listen(address, listener._on_stream)
    return listener
