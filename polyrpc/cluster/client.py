"""The cluster client: one connection per live server of a service, a selector choosing
among them, fail modes, health tracking, broadcast and fork."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import CallTimeout, ConnectFailed, ConnectionLost, PolyrpcError, RemoteError
from ..rpc.connection import MiddlewareStream, ResultStream
from ..rpc.endpoints import Client
from ..rpc.endpoints import connect as connect_one
from ..session.session import SessionConfig
from .discovery import Discovery, Instance
from .health import Backoff, CircuitBreaker
from .preference import DEFAULT_PREFERENCE, choose_url
from .selectors import Selector, make_selector

log = logging.getLogger("polyrpc.cluster")

FAIL_MODES = ("failfast", "failover", "failtry", "backup")

UNPROCESSED_CODES = frozenset({"overloaded", "too_many_calls"})
"""RemoteError codes meaning the server refused the call before running it."""


def _never_ran(exc: BaseException) -> bool:
    """Whether the call surely did not run: it was never sent, or the server refused it."""
    if isinstance(exc, ConnectFailed):
        return True
    return isinstance(exc, RemoteError) and exc.code in UNPROCESSED_CODES


def _server_failure(exc: BaseException) -> bool:
    """Whether ``exc`` counts against the server's health (not the call's own error)."""
    return isinstance(exc, ConnectionLost | CallTimeout) or _never_ran(exc)


class Member:
    """One server of the service: its connection, kept up with backoff, and its health."""

    def __init__(self, instance: Instance, cluster: ClusterClient) -> None:
        self.instance = instance
        self.cluster = cluster
        self.connection: Client | None = None
        self.url: str | None = None
        self.in_flight = 0
        self.latency = 0.001
        """Recent call latency in seconds (moving average), read by least_loaded."""
        self.breaker = CircuitBreaker(cluster.breaker_threshold, cluster.breaker_reset)
        self.backoff = Backoff(*cluster.backoff)
        self.last_error: BaseException | None = None
        self.attempted = asyncio.Event()
        """Set once the first connect attempt has ended, either way."""
        self._probe: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def weight(self) -> int:
        return self.instance.weight

    @property
    def live(self) -> bool:
        """Connected, and its circuit breaker is closed: it may get calls."""
        connection = self.connection
        return (
            connection is not None and not connection.is_closed and self.breaker.opened_at is None
        )

    async def _maintain(self) -> None:
        """Connect, wait for the connection to end (marked down at once), reconnect after
        a backoff; until the member is closed."""
        while True:
            self.url = choose_url(self.instance.urls, self.cluster.prefer)
            try:
                if self.url is None:
                    raise ConnectFailed(
                        f"none of {', '.join(self.instance.urls)} is usable here "
                        f"(preference {', '.join(self.cluster.prefer)})"
                    )
                connection = await self.cluster.dial(self.url)
            except Exception as exc:  # anything, a bad option too, shows in calls' errors
                self.last_error = exc
                self.breaker.record_failure()
                self.attempted.set()
                delay = self.backoff.next_delay()
                level = logging.INFO if isinstance(exc, PolyrpcError | OSError) else logging.WARNING
                log.log(level, "%s: connect failed (%r); again in %.2fs", self.id, exc, delay)
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            self.breaker.record_success()
            self.connection = connection
            self.attempted.set()
            self.cluster.changed()
            error = await connection.wait_closed()
            self.connection = None
            self.last_error = error or ConnectionLost(f"{self.id}: connection closed")
            self.cluster.changed()
            log.info("%s: connection lost (%s)", self.id, error)
            await asyncio.sleep(self.backoff.next_delay())

    def succeeded(self, seconds: float) -> None:
        self.latency += (seconds - self.latency) * 0.2
        was_open = self.breaker.opened_at is not None
        self.breaker.record_success()
        if was_open:
            self.cluster.changed()

    def failed(self, exc: BaseException) -> None:
        self.last_error = exc
        if self.breaker.record_failure():
            log.warning("%s: circuit open after %d failures", self.id, self.breaker.failures)
            self.cluster.changed()
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._half_open_probes())

    async def _half_open_probes(self) -> None:
        """While the breaker is open: when it turns half-open, ping; success closes it.
        A server whose connection is down is probed by the reconnect loop instead."""
        while self.breaker.opened_at is not None:
            await asyncio.sleep(self.breaker.wait)
            connection = self.connection
            if connection is None or connection.is_closed:
                return
            try:
                await connection.call("_sys.ping", timeout=self.cluster.breaker_reset)
            except (PolyrpcError, OSError) as exc:
                self.last_error = exc
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
                self.cluster.changed()

    async def call(
        self, method: str, args: tuple, kwargs: dict, timeout: float | None, metadata: Any
    ) -> Any:
        """One call on this server, measured and counted for its health."""
        connection = self.connection
        if connection is None or connection.is_closed:
            raise ConnectFailed(f"{self.id} is down: {self.last_error}")
        self.in_flight += 1
        started = time.monotonic()
        try:
            result = await connection.call(
                method, *args, timeout=timeout, metadata=metadata, **kwargs
            )
        except Exception as exc:
            if _server_failure(exc):
                self.failed(exc)
            raise
        finally:
            self.in_flight -= 1
        self.succeeded(time.monotonic() - started)
        return result

    async def close(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.connection is not None:
            await self.connection.close()

    def __repr__(self) -> str:
        state = "live" if self.live else f"down ({self.last_error})"
        return f"<Member {self.id} via {self.url} {state} in_flight={self.in_flight}>"


class ClusterClient:
    """A client of a whole service: ``call``, ``proxy``, ``notify``, ``stream`` as on a
    :class:`~polyrpc.Client`, spread over the live servers that ``discovery`` reports.

    ``select``: round_robin, random, weighted, consistent_hash (by ``call(..., key=)``),
    least_loaded. ``on_failure``: failfast, failover (another server, within the deadline,
    when the call never ran or is marked ``idempotent=True``), failtry (the same server
    again, same rule), backup (a hedged second call after ``backup_delay``; the first
    answer wins). ``idempotent``: methods always safe to retry. ``prefer``: the transport
    schemes to dial, best first.
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        services: Iterable[Any] = (),
        select: str | Selector = "round_robin",
        on_failure: str = "failover",
        prefer: Sequence[str] = DEFAULT_PREFERENCE,
        timeout: float = 10.0,
        retries: int = 2,
        backup_delay: float = 0.05,
        breaker_threshold: int = 5,
        breaker_reset: float = 1.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        idempotent: Iterable[str] = (),
        token: str | None = None,
        config: SessionConfig | None = None,
        **options: Any,
    ) -> None:
        if on_failure not in FAIL_MODES:
            raise ValueError(f"unknown on_failure {on_failure!r}; choose one of {FAIL_MODES}")
        self.discovery = discovery
        self.selector = make_selector(select)
        self.on_failure = on_failure
        self.prefer = tuple(prefer)
        self.timeout = timeout
        """Seconds to connect, and for a call without a timeout to wait for a live server."""
        self.retries = retries
        self.backup_delay = backup_delay
        self.breaker_threshold = breaker_threshold
        self.breaker_reset = breaker_reset
        self.backoff = backoff
        self.idempotent = frozenset(idempotent)
        """Methods ("Service.method", or "Service.*" for all of one service) that may always
        be retried, as if each call said ``idempotent=True``."""
        self._services = list(services)
        self._connect_options = {"token": token, "config": config, **options}
        self.members: dict[str, Member] = {}
        self._changed = asyncio.Event()
        self._snapshot = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def dial(self, url: str) -> Client:
        """A connection to one server (the cluster's callbacks served on it)."""
        opening = connect_one(
            url, services=self._services, timeout=self.timeout, **self._connect_options
        )
        return await opening

    async def start(self) -> ClusterClient:
        """Start watching; return once the first list of servers has been tried."""
        watcher = self._watcher = asyncio.get_running_loop().create_task(self._watch())
        snapshot = asyncio.ensure_future(self._snapshot.wait())
        first: set[asyncio.Future[Any]] = {watcher, snapshot}
        await asyncio.wait(first, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        snapshot.cancel()
        if watcher.done():  # the backend failed (or ended) before its first list
            error = watcher.exception() or ConnectFailed("the discovery watch ended at once")
            await self.close()
            raise error
        attempts = [asyncio.ensure_future(m.attempted.wait()) for m in self.members.values()]
        if attempts:
            await asyncio.wait(attempts, timeout=self.timeout)
            for attempt in attempts:
                attempt.cancel()
        return self

    async def _watch(self) -> None:
        async with contextlib.aclosing(self.discovery.watch()) as snapshots:
            async for instances in snapshots:
                self._apply(instances)

    def _apply(self, instances: list[Instance]) -> None:
        """Make the members match a snapshot: connect to new servers, drop gone ones."""
        wanted = {instance.id: instance for instance in instances}
        for member_id in [m for m in self.members if m not in wanted]:
            log.info("%s left the service", member_id)
            self._drop(member_id)
        for member_id, instance in wanted.items():
            current = self.members.get(member_id)
            if current is not None and current.instance.urls != instance.urls:
                self._drop(member_id)
                current = None
            if current is None:
                self.members[member_id] = Member(instance, self)
            else:
                current.instance = instance  # weight or metadata may change
        self._snapshot.set()
        self.changed()

    def _drop(self, member_id: str) -> None:
        """Forget a server and close its connection in the background."""
        task = asyncio.get_running_loop().create_task(self.members.pop(member_id).close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def changed(self) -> None:
        """Wake the calls waiting for a live server."""
        self._changed.set()
        self._changed = asyncio.Event()

    def live(self) -> list[Member]:
        """The servers that may get calls now, in id order."""
        return [m for _, m in sorted(self.members.items()) if m.live]

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    async def choose(self, key: str | None, deadline: float, exclude: Iterable[str] = ()) -> Member:
        """A live server picked by the selector, waiting for one up to ``deadline``."""
        excluded = set(exclude)
        while True:
            if self._closed:
                raise ConnectionLost("the cluster client is closed")
            candidates = [m for m in self.live() if m.id not in excluded]
            if candidates:
                chosen = self.selector.pick(candidates, key)
                assert isinstance(chosen, Member)
                return chosen
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (excluded and self.live()):
                errors = "; ".join(f"{m.id}: {m.last_error}" for m in self.members.values())
                raise ConnectFailed(f"no live server to call ({errors or 'none discovered'})")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        key: str | None = None,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on a server picked by the selector, failing as ``on_failure`` says.

        ``key`` is what consistent_hash routes by; ``idempotent=True`` lets failover and
        failtry retry a call that may have run already (otherwise only one that surely
        did not: never sent, or refused as overloaded). ``timeout`` bounds the whole call,
        retries and waiting for a live server included.
        """
        deadline = self._deadline(timeout)
        idempotent = idempotent or self._is_idempotent(method)
        if self.on_failure == "backup":
            return await self._hedged(method, args, kwargs, deadline, timeout, metadata, key)
        tried: list[str] = []
        member: Member | None = None
        last_error: Exception | None = None
        while True:
            if self.on_failure == "failtry" and member is not None:
                await self._wait_live(member, deadline)
            else:
                try:
                    member = await self.choose(key, deadline, tried)
                except ConnectFailed:
                    if last_error is None:
                        raise
                    raise last_error from None  # every server tried: the last one's error
            try:
                return await member.call(
                    method, args, kwargs, self._remaining(deadline, timeout), metadata
                )
            except Exception as exc:
                retry = _never_ran(exc) or (idempotent and isinstance(exc, ConnectionLost))
                if (
                    self.on_failure == "failfast"
                    or not retry
                    or len(tried) >= self.retries
                    or time.monotonic() >= deadline
                ):
                    raise
                log.info("%s on %s failed (%s); retrying", method, member.id, exc)
                tried.append(member.id)
                last_error = exc

    def _is_idempotent(self, method: str) -> bool:
        if not self.idempotent:
            return False
        return method in self.idempotent or f"{method.split('.', 1)[0]}.*" in self.idempotent

    async def _wait_live(self, member: Member, deadline: float) -> None:
        """Wait for ``member`` to be live again (failtry); ConnectFailed at the deadline
        or if it left the service."""
        while not member.live:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.members.get(member.id) is not member:
                raise ConnectFailed(f"{member.id} did not come back: {member.last_error}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    @staticmethod
    def _remaining(deadline: float, timeout: float | None) -> float | None:
        """A call's own timeout: what is left of the caller's (None if the caller gave none)."""
        if timeout is None:
            return None
        return max(0.001, deadline - time.monotonic())

    async def _hedged(
        self,
        method: str,
        args: tuple,
        kwargs: dict,
        deadline: float,
        timeout: float | None,
        metadata: dict[str, str] | None,
        key: str | None,
    ) -> Any:
        """Call one server; if it has not answered after ``backup_delay`` (or lost the
        call before that), a second one too: the first answer wins and the other call is
        cancelled."""
        first = await self.choose(key, deadline)
        remaining = self._remaining(deadline, timeout)
        running: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(first.call(method, args, kwargs, remaining, metadata))
        }
        try:
            done, _ = await asyncio.wait(running, timeout=self.backup_delay)
            lost = [task.exception() for task in done]
            if not done or (lost[0] is not None and _server_failure(lost[0])):
                others = [m for m in self.live() if m is not first]
                if others:
                    backup = self.selector.pick(others, key)
                    assert isinstance(backup, Member)
                    remaining = self._remaining(deadline, timeout)
                    running.add(
                        asyncio.ensure_future(
                            backup.call(method, args, kwargs, remaining, metadata)
                        )
                    )
            return await _first_success(running)
        finally:
            for task in running:
                task.cancel()

    async def broadcast(
        self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Call ``method`` on every live server; all must succeed (once all have ended,
        the first error is raised). Returns each server's result by its id."""
        deadline = self._deadline(timeout)
        await self.choose(None, deadline)  # at least one
        members = self.live()
        results = await asyncio.gather(
            *(
                m.call(method, args, kwargs, self._remaining(deadline, timeout), None)
                for m in members
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {m.id: result for m, result in zip(members, results, strict=True)}

    async def fork(
        self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Call ``method`` on every live server; the first success wins and the other calls
        are cancelled (the last error is raised if all fail)."""
        deadline = self._deadline(timeout)
        await self.choose(None, deadline)
        running: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(
                m.call(method, args, kwargs, self._remaining(deadline, timeout), None)
            )
            for m in self.live()
        }
        try:
            return await _first_success(running)
        finally:
            for task in running:
                task.cancel()

    async def notify(self, method: str, *args: Any, key: str | None = None, **kwargs: Any) -> None:
        """Send a one-way call to a server picked by the selector."""
        member = await self.choose(key, self._deadline(None))
        connection = member.connection
        if connection is None:
            raise ConnectFailed(f"{member.id} is down")
        await connection.notify(method, *args, **kwargs)

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> ClusterStream:
        """Iterate a streaming method's items, from a server picked when iteration starts."""
        return ClusterStream(
            self,
            key,
            lambda conn: conn.stream(method, *args, timeout=timeout, metadata=metadata, **kwargs),
            timeout,
        )

    def proxy(self, service: str) -> ClusterProxy:
        """An object whose methods call ``service``'s: ``await proxy.mul(3, 4)``."""
        return ClusterProxy(self, service)

    async def close(self) -> None:
        """Stop watching and close every connection."""
        self._closed = True
        self.changed()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        members, self.members = list(self.members.values()), {}
        await asyncio.gather(*(m.close() for m in members), *self._closing, return_exceptions=True)
        await self.discovery.close()

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<ClusterClient {len(self.live())}/{len(self.members)} live>"


async def _first_success(running: set[asyncio.Future[Any]]) -> Any:
    """The first result among ``running``; the last error if every one fails."""
    pending = set(running)
    error: BaseException | None = None
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is None:
                return task.result()
            error = task.exception()
    assert error is not None
    raise error


class ClusterStream:
    """A streaming call on a cluster: the server is picked when iteration starts."""

    def __init__(
        self,
        cluster: ClusterClient,
        key: str | None,
        open_stream: Callable[[Client], ResultStream | MiddlewareStream],
        timeout: float | None,
    ) -> None:
        self._cluster = cluster
        self._key = key
        self._open = open_stream
        self._timeout = timeout
        self._inner: ResultStream | MiddlewareStream | None = None

    def __aiter__(self) -> ClusterStream:
        return self

    async def __anext__(self) -> Any:
        if self._inner is None:
            member = await self._cluster.choose(self._key, self._cluster._deadline(self._timeout))
            if member.connection is None:
                raise ConnectFailed(f"{member.id} is down")
            self._inner = self._open(member.connection)
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()

    async def __aenter__(self) -> ClusterStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ClusterProxy:
    """``cluster.proxy("Arith").mul(3, 4)``."""

    def __init__(self, cluster: ClusterClient, service: str) -> None:
        self._cluster = cluster
        self._service = service

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self._cluster.call, f"{self._service}.{name}")
