"""What the benchmark measures: rows ("targets") that can serve and call an echo.

Every row, polyrpc transport or hand-written reference, implements :class:`Target`:
the server half runs in one process, the client half in another, and the echo
workloads only ever call :meth:`EchoClient.echo`, so all rows are driven alike.
Rows with a one-way send also run the ``stream`` workload through
:meth:`EchoClient.push` and :meth:`EchoClient.received`.
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..messages import Connection, dial, listen
from ..rpc.endpoints import Client, Server, connect
from ..rpc.middleware import Call, CallNext, Middleware
from ..stream.registry import registry
from ..stream.transport import Transport

CONNECT_TIMEOUT = 60.0
"""Seconds a benchmark client may take to connect: the bench measures steady state, and on
an impaired path (say 10% loss) a handshake can need several retransmissions."""

_PATIENT: dict[str, Any] = {"timeout": CONNECT_TIMEOUT, "handshake_timeout": CONNECT_TIMEOUT}
_PATIENT_SERVER: dict[str, Any] = {"handshake_timeout": CONNECT_TIMEOUT}
CONNECT_OPTIONS = {"quic": "timeout", "rdma": "timeout"}
"""URL options that bound a transport's own handshake (raised to CONNECT_TIMEOUT)."""

NETWORKS = {"quic": "udp", "kcp": "udp", "unix": "unix", "rdma": "rdma", "mem": "memory"}
"""The carrier of each scheme that does not run over TCP."""


class EchoClient(ABC):
    """A connected client: ``echo`` sends ``payload`` and returns the server's copy."""

    @abstractmethod
    async def echo(self, payload: bytes) -> bytes: ...

    async def push(self, payload: bytes) -> None:
        """Send ``payload`` one-way (the stream workload); waits only while flow control says so.
        Only rows whose :attr:`Target.one_way` is true provide it."""
        raise NotImplementedError(f"{type(self).__name__} has no one-way send")

    async def received(self) -> int:
        """How many payload bytes the server has taken in, counting every push made before."""
        raise NotImplementedError(f"{type(self).__name__} has no one-way send")

    @abstractmethod
    async def close(self) -> None: ...


class Target(ABC):
    """One row of the benchmark table."""

    name: str
    kind: str = "message"
    """``message`` (message core), ``rpc`` (the call API) or ``reference`` (not polyrpc)."""
    network: str = "tcp"
    """What carries the bytes (``tcp``, ``udp``, ``unix``...): decides how a path is impaired."""
    one_way: bool = False
    """Whether its clients can :meth:`EchoClient.push` (the ``stream`` workload)."""

    def unavailable_reason(self) -> str | None:
        """None if this row can run here, else why not."""
        return None

    @abstractmethod
    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        """Start an echo server; return what the client needs to connect and a stop function."""

    @abstractmethod
    async def connect(self, info: str) -> EchoClient:
        """Connect to the server described by ``info`` (what :meth:`serve` returned)."""


COUNT_QUERY = b""
"""The one-way message that asks a message-core server for its byte count (stream payloads
are never empty); the server answers with a one-way message holding the count."""


async def _count_messages(connection: Connection) -> None:
    """Server side of the stream workload: count payload bytes, answer each count query."""
    taken = 0
    async for message in connection:
        if message == COUNT_QUERY:
            await connection.send(taken)
        else:
            taken += len(message)


class _ConnectionClient(EchoClient):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.echo = connection.request  # type: ignore[method-assign, assignment]  # no wrapper on the hot path

    async def echo(self, payload: bytes) -> bytes:
        return await self.connection.request(payload)

    async def push(self, payload: bytes) -> None:
        await self.connection.send(payload)

    async def received(self) -> int:
        await self.connection.send(COUNT_QUERY)
        return await self.connection.receive()

    async def close(self) -> None:
        await self.connection.close()


class MessageTarget(Target):
    """A polyrpc transport through the message core (request/reply of raw bytes)."""

    kind = "message"
    one_way = True

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.name = scheme
        self.network = NETWORKS.get(scheme, "tcp")

    def unavailable_reason(self) -> str | None:
        return registry.get(self.scheme).unavailable_reason()

    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        transport = registry.get(self.scheme)
        listen_url, client_options = transport.loopback_urls(workdir)
        listener = await listen(
            self._patient(transport, listen_url),
            _count_messages,
            on_request=lambda message: message,
            **_PATIENT_SERVER,
        )
        return self._patient(transport, listener.url, client_options), listener.close

    def _patient(
        self, transport: Transport, url: str, options: dict[str, str] | None = None
    ) -> str:
        """``url`` with ``options`` and the benchmark's connect patience where the transport
        has its own handshake timeout: on both sides, since a server drops a connection still
        in the handshake after its own timeout (quic: 5 s, which lost Initials on an impaired
        path can exceed)."""
        options = dict(options or {})
        option = CONNECT_OPTIONS.get(self.scheme)
        if option is not None:
            options[option] = f"{CONNECT_TIMEOUT:g}"
        return str(transport.parse(url).with_options(**options))

    async def connect(self, info: str) -> EchoClient:
        return _ConnectionClient(await dial(info, max_in_flight=1024, **_PATIENT))


class EchoService:
    """What the RPC rows call: an async echo, and a byte counter for one-way notifications."""

    def __init__(self) -> None:
        self.taken = 0

    async def echo(self, payload: bytes) -> bytes:
        return payload

    async def take(self, payload: bytes) -> None:
        """The stream workload's notification: count it (async: a sync handler would run in
        a thread, and ``received`` could miss it)."""
        self.taken += len(payload)

    async def received(self) -> int:
        """Bytes taken so far. A notification runs in a task, while a call starts the moment
        it is decoded: yield once, so that the task of every notification that arrived
        before this call (each finishes in one step) has run."""
        await asyncio.sleep(0)
        return self.taken


class _RpcClient(EchoClient):
    def __init__(self, client: Client) -> None:
        self.client = client
        # what a user's loop runs: one ``call`` coroutine per echo, no wrapper around it
        self.echo = functools.partial(client.call, "Echo.echo")  # type: ignore[method-assign]

    async def echo(self, payload: bytes) -> bytes:
        return await self.client.call("Echo.echo", payload)

    async def push(self, payload: bytes) -> None:
        await self.client.notify("Echo.take", payload)

    async def received(self) -> int:
        return await self.client.call("Echo.received")

    async def close(self) -> None:
        await self.client.close()


async def pass_through(call: Call, call_next: CallNext) -> Any:
    """The middleware of the ``+mw`` rows: it only goes on, so the row shows what having
    middleware installed costs."""
    return await call_next(call)


class RpcTarget(MessageTarget):
    """A polyrpc transport through the RPC API (``client.call`` of an async method);
    ``middleware_on`` names the sides ("server", "client") with :func:`pass_through`."""

    kind = "rpc"

    def __init__(self, scheme: str, middleware_on: tuple[str, ...] = ()) -> None:
        super().__init__(scheme)
        self.middleware_on = middleware_on
        self.name = f"{scheme}/rpc"
        if middleware_on:
            both = len(middleware_on) == 2
            self.name += "+mw" if both else f"+mw={middleware_on[0]}"

    def _middleware(self, side: str) -> list[Middleware]:
        return [pass_through] if side in self.middleware_on else []

    async def serve(self, workdir: Path) -> tuple[str, Callable[[], Awaitable[None]]]:
        transport = registry.get(self.scheme)
        listen_url, client_options = transport.loopback_urls(workdir)
        server = Server(middleware=self._middleware("server"), **_PATIENT_SERVER)
        server.register(EchoService(), "Echo")
        bound = await server.start(self._patient(transport, listen_url))
        return self._patient(transport, bound, client_options), server.close

    async def connect(self, info: str) -> EchoClient:
        client = await connect(
            info, max_in_flight=1024, middleware=self._middleware("client"), **_PATIENT
        )
        return _RpcClient(client)
