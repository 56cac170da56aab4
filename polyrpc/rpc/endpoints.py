"""The RPC entry points: :class:`Server` / :func:`serve` and :class:`Client` / :func:`connect`."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any

from ..messages import MAX_HANDSHAKING, HandshakeGate, make_config, open_session
from ..session.session import SessionConfig
from ..stream.registry import registry
from ..stream.trait import Listener, Stream
from ..wire.frames import Limits
from .connection import MiddlewareConnection, RpcConnection, RpcOptions, SyncRunner
from .middleware import Middleware
from .services import ServiceRegistry

log = logging.getLogger("polyrpc")


class Client(RpcConnection):
    """A connection made with :func:`connect`; it may also serve callbacks."""


class MiddlewareClient(MiddlewareConnection, Client):
    """A :class:`Client` made with middleware: its calls go through the chain too."""


class _Opening:
    """What :func:`connect` and :func:`serve` return: await it, or use it as ``async with``."""

    def __init__(self, factory: Callable[[], Awaitable[Any]]) -> None:
        self._factory = factory
        self._opened: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._factory().__await__()

    async def __aenter__(self) -> Any:
        self._opened = await self._factory()
        return self._opened

    async def __aexit__(self, *exc_info: object) -> None:
        await self._opened.close()


def connect(
    url: str,
    *,
    services: Iterable[Any] = (),
    token: str | None = None,
    timeout: float = 10.0,
    config: SessionConfig | None = None,
    middleware: Sequence[Middleware] = (),
    **options: Any,
) -> _Opening:
    """Connect to a polyrpc server at ``url``.

    ``services`` are objects the server may call back; ``middleware`` wraps every call
    made on the connection and every callback served on it (docs/middleware.md);
    ``options`` are SessionConfig fields (codec, max_in_flight, heartbeat_interval,
    idle_timeout, limits...).
    """

    async def make() -> Client:
        cfg = make_config(config, token=token, **options)
        rpc = RpcOptions(middleware=tuple(middleware))
        for service in services:
            rpc.services.register(service)
        kind = MiddlewareClient if rpc.middleware else Client
        session = await open_session(
            url, lambda stream: kind(stream, cfg, is_client=True, options=rpc), timeout
        )
        assert isinstance(session, Client)
        return session

    return _Opening(make)


class SystemService:
    """The built-in ``_sys`` service: liveness, statistics and introspection."""

    def __init__(self, server: Server) -> None:
        self._server = server

    async def ping(self) -> str:
        """Answer "pong": the server is alive and reachable."""
        return "pong"

    async def stats(self) -> dict[str, Any]:
        """Uptime, connections, per-method calls/errors/latency, bytes per transport."""
        return self._server.stats()

    async def methods(self) -> list[dict[str, str]]:
        """Every method: name, signature, kind and docstring."""
        return self._server.services.describe()


class Server:
    """Serves registered services on one or more URLs, over any transports at once.

    Admission: ``max_connections`` caps the connections, each counted once whether it is
    still in the handshake or admitted (a client over it gets HandshakeError
    ``too_many_connections``); ``max_handshaking`` caps those still in the handshake, the
    only ones an unauthenticated peer can hold: a newcomer over it is closed at once,
    with one small ERROR frame (``too_many_handshakes``) and no HELLO processing. With
    the 10 s handshake timeout, 128 leaves room for bursts of thousands of handshakes a
    second while pre-authentication memory stays a small fixed amount.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        max_connections: int = 10_000,
        max_handshaking: int = MAX_HANDSHAKING,
        max_concurrent_calls: int = 1024,
        limits: Limits | None = None,
        inline_sync: bool = False,
        sync_workers: int = 32,
        sync_queue: int = 1024,
        send_tracebacks: bool = False,
        middleware: Sequence[Middleware] = (),
        config: SessionConfig | None = None,
        worker: int | None = None,
        **options: Any,
    ) -> None:
        """``sync_workers`` threads run sync handlers (never the event loop, unless
        ``inline_sync``); at most ``sync_queue`` more sync calls wait for one, beyond that
        a call is refused with code ``overloaded`` and a notification dropped (logged).
        ``middleware`` wraps every call served and every callback made on the server's
        connections, outermost first (docs/middleware.md). ``worker``: this process's
        number among ``polyrpc serve --workers`` (in the stats)."""
        self.worker = worker
        self.config = make_config(config, token=token, limits=limits, **options)
        self.services = ServiceRegistry()
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self._gate = HandshakeGate(max_handshaking)
        self._rpc = RpcOptions(
            services=self.services,
            max_concurrent_calls=max_concurrent_calls,
            inline_sync=inline_sync,
            send_tracebacks=send_tracebacks,
            sync=SyncRunner(sync_workers, sync_queue),
            middleware=tuple(middleware),
        )
        self.listeners: list[Listener] = []
        self.connections: set[RpcConnection] = set()
        """Connections that completed the handshake and are open."""
        self.handshaking = self._gate.handshaking
        """Connections still in the handshake."""
        self._admitting: set[asyncio.Task[None]] = set()
        self._closed_bytes: dict[str, list[int]] = {}
        self._total_connections = 0
        self._closed = asyncio.Event()
        self.services.register(SystemService(self), "_sys")

    def register(self, obj: Any, name: str | None = None) -> list[str]:
        """Expose ``obj`` (its public methods, as ``Name.method``) or a function."""
        return self.services.register(obj, name)

    @property
    def urls(self) -> list[str]:
        """The URLs being served, with port 0 resolved to the bound port."""
        return [listener.url for listener in self.listeners]

    async def start(self, url: str) -> str:
        """Listen on ``url`` as well; returns the bound URL."""
        transport, address = registry.resolve(url)
        listener = await transport.listen(address, self._on_stream)
        self.listeners.append(listener)
        log.info("serving on %s", listener.url)
        return listener.url

    @property
    def max_handshaking(self) -> int:
        """The cap on connections still in the handshake."""
        return self._gate.limit

    def _on_stream(self, stream: Stream) -> None:
        if not self._gate.admit(stream):
            return
        kind = MiddlewareConnection if self._rpc.middleware else RpcConnection
        connection = kind(stream, self.config, is_client=False, options=self._rpc)
        if len(self.connections) + len(self.handshaking) >= self.max_connections:
            # one gone stays in these sets until its task wakes; it must not refuse a newcomer
            self._gate.forget_gone()
            self.connections.difference_update([c for c in self.connections if c.is_closed])
        if len(self.connections) + len(self.handshaking) >= self.max_connections:
            log.warning(
                "refusing %s connection from %s: max_connections",
                stream.transport_name,
                connection.peer,
            )
            connection.refuse(
                "too_many_connections",
                f"the server is at its limit of {self.max_connections} connections",
            )
        handshake = self._gate.handshake(connection)
        task = asyncio.get_running_loop().create_task(self._admit(connection, handshake))
        self._admitting.add(task)
        task.add_done_callback(self._admitting.discard)

    async def _admit(self, connection: RpcConnection, handshake: Awaitable[bool]) -> None:
        if not await handshake:
            return
        self.connections.add(connection)
        self._total_connections += 1
        await connection.wait_closed()
        self.connections.discard(connection)
        totals = self._closed_bytes.setdefault(connection.transport, [0, 0])
        totals[0] += connection.bytes_in
        totals[1] += connection.bytes_out

    def stats(self) -> dict[str, Any]:
        """What ``_sys.stats`` returns."""
        per_transport: dict[str, dict[str, int]] = {}
        for transport, (received, sent) in self._closed_bytes.items():
            per_transport[transport] = {"bytes_in": received, "bytes_out": sent}
        for conn in self.connections:
            entry = per_transport.setdefault(conn.transport, {"bytes_in": 0, "bytes_out": 0})
            entry["bytes_in"] += conn.bytes_in
            entry["bytes_out"] += conn.bytes_out
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.services.started, 3),
            "connections": len(self.connections),
            "connections_total": self._total_connections,
            "methods": {name: s.snapshot() for name, s in self.services.stats.items() if s.calls},
            "transports": per_transport,
        }

    async def close(self, timeout: float | None = None) -> None:
        """Stop listening, let in-flight calls finish (up to the close timeout), disconnect."""
        for listener in self.listeners:
            await listener.close()
        await self._gate.close()
        for task in list(self._admitting):
            if not self.connections:
                task.cancel()
        await asyncio.gather(*(c.close() for c in list(self.connections)), return_exceptions=True)
        self._rpc.sync.shutdown()
        self._closed.set()

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` is called (e.g. from a signal handler)."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def serve(urls: str | Iterable[str], *services: Any, **server_options: Any) -> _Opening:
    """Start a :class:`Server` for ``services`` on ``urls`` (one URL or several)."""

    async def make() -> Server:
        server = Server(**server_options)
        for service in services:
            if isinstance(service, tuple) and len(service) == 2 and isinstance(service[0], str):
                server.register(service[1], service[0])
            else:
                server.register(service)
        try:
            for url in [urls] if isinstance(urls, str) else list(urls):
                await server.start(url)
        except BaseException:
            await server.close()
            raise
        return server

    return _Opening(make)
