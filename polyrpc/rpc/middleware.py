"""Middleware: async callables wrapped around every call a connection makes or serves.

A middleware is ``async def mw(call: Call, call_next) -> Any``: it may look at or change
``call``, return ``await call_next(call)`` (once, several times, or never: a short-circuit
with its own result or exception), and time or log around it. An endpoint's list is
composed once per connection (:func:`compose`), outermost first; with an empty list a
connection takes exactly the paths it takes without middleware. See docs/middleware.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CallTimeout, RemoteError

if TYPE_CHECKING:
    from ..wire.frames import Frame
    from .connection import CallContext, RpcConnection

log = logging.getLogger("polyrpc")


class Call:
    """One call as middleware sees it; what a middleware changes is what the next one (and in
    the end the handler, or the wire) gets."""

    __slots__ = (
        "_served",
        "args",
        "connection",
        "deadline",
        "incoming",
        "kind",
        "kwargs",
        "metadata",
        "method",
    )

    def __init__(
        self,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        metadata: dict[str, str],
        kind: str,
        connection: RpcConnection,
        deadline: float | None = None,
        served: tuple[RpcConnection, Frame, float] | None = None,
    ) -> None:
        self.method = method
        """``Service.method``."""
        self.args = args
        """Positional arguments; a streamed argument is its async iterable (caller side) or
        the handler's ``ArgumentStream`` (serving side), which a middleware may wrap."""
        self.kwargs = kwargs
        self.metadata = metadata
        """Sent with the request: what a caller's middleware adds here reaches the serving
        side's ``call.metadata`` and the handler's ``CallContext.metadata``."""
        self.kind = kind
        """``call``, ``notify`` (no result) or ``stream`` (``call_next`` returns the async
        iterator of the items, which a middleware may wrap)."""
        self.incoming = served is not None
        """True where this side serves the call (the peer made it), False where it makes it."""
        self.connection = connection
        self.deadline = deadline
        """Seconds since the epoch after which the caller stops waiting, or None."""
        self._served = served
        """What the serving side's :class:`CallContext` is made of, when it is asked for."""

    @property
    def context(self) -> CallContext | None:
        """The handler's :class:`CallContext` (serving side only, else None)."""
        if self._served is None:
            return None
        from .connection import CallContext  # the module that imports this one

        return CallContext(*self._served)

    def __repr__(self) -> str:
        side = "served" if self.incoming else "made"
        return f"<Call {self.kind} {self.method} {side} on {self.connection!r}>"

    @property
    def timeout(self) -> float | None:
        """Seconds left before :attr:`deadline`, or None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    @property
    def peer(self) -> Any:
        return self.connection.peer

    @property
    def transport(self) -> str:
        return self.connection.transport


CallNext = Callable[[Call], Awaitable[Any]]
"""What a middleware calls to go on: the next middleware, or at the end the call itself."""
Middleware = Callable[[Call, CallNext], Awaitable[Any]]
"""``async def middleware(call, call_next)``."""


def compose(middleware: Sequence[Middleware], innermost: CallNext) -> CallNext:
    """One callable running ``middleware`` outermost first, ``innermost`` last; built once per
    connection, so a call pays one plain function call per middleware and nothing more."""
    chain = innermost
    for outer in reversed(middleware):
        chain = _link(outer, chain)
    return chain


def _link(middleware: Middleware, call_next: CallNext) -> CallNext:
    def run(call: Call) -> Awaitable[Any]:
        return middleware(call, call_next)

    return run


# ------------------------------------------------------------------ built-ins
def log_calls(logger: logging.Logger = log, level: int = logging.INFO) -> Middleware:
    """Log each call's direction, method and duration (streams: until their iterator is
    handed over), and its exception if it raised."""

    async def logging_middleware(call: Call, call_next: CallNext) -> Any:
        started = time.perf_counter()
        direction = "served" if call.incoming else "called"
        try:
            result = await call_next(call)
        except BaseException as exc:
            elapsed = (time.perf_counter() - started) * 1e3
            logger.log(
                level, "%s %s failed after %.1f ms: %r", direction, call.method, elapsed, exc
            )
            raise
        elapsed = (time.perf_counter() - started) * 1e3
        logger.log(level, "%s %s in %.1f ms", direction, call.method, elapsed)
        return result

    return logging_middleware


def limit_concurrency(limit: int) -> Middleware:
    """Let at most ``limit`` calls through at once (a stream holds its place until it ends);
    the others wait their turn. One limit is shared by every connection of the endpoint."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    places = asyncio.Semaphore(limit)

    async def limiting_middleware(call: Call, call_next: CallNext) -> Any:
        await places.acquire()
        try:
            result = await call_next(call)
        except BaseException:
            places.release()
            raise
        if call.kind == "stream":
            return _release_when_done(result, places)
        places.release()
        return result

    return limiting_middleware


async def _release_when_done(items: Any, places: asyncio.Semaphore) -> AsyncIterator[Any]:
    """``items`` (an async or plain iterable), releasing one place once it ends or is closed;
    closing it closes ``items`` too (a remote stream is cancelled, a generator finishes)."""
    try:
        if hasattr(items, "__aiter__"):
            async for item in items:
                yield item
        else:
            for item in items:
                yield item
    finally:
        places.release()
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


NOT_RUN_CODES = frozenset({"too_many_calls", "overloaded"})
"""RemoteError codes of calls refused before their handler ran: safe to retry for any method."""


def retry(
    attempts: int = 3,
    backoff: float = 0.05,
    *,
    idempotent: Collection[str] | Callable[[Call], bool] = (),
    retry_on: tuple[type[BaseException], ...] = (RemoteError, CallTimeout),
) -> Middleware:
    """Retry a failed outgoing call up to ``attempts`` times in all, waiting ``backoff * 2**n``
    (n = 0, 1, ...) between tries and never past the call's deadline.

    A method that is ``idempotent`` (named in the collection, or the predicate says so) is
    retried after any ``retry_on`` error; any other only after a refusal that proves its
    handler never ran (:data:`NOT_RUN_CODES`). Notifications, streams, calls with a streamed
    argument (it cannot be sent twice) and incoming calls pass through untouched.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    if callable(idempotent):
        is_idempotent = idempotent
    else:
        names = frozenset([idempotent] if isinstance(idempotent, str) else idempotent)

        def is_idempotent(call: Call) -> bool:
            return call.method in names

    def retryable(call: Call, exc: Exception) -> bool:
        if isinstance(exc, RemoteError) and exc.code in NOT_RUN_CODES:
            return True
        return isinstance(exc, retry_on) and is_idempotent(call)

    async def retrying_middleware(call: Call, call_next: CallNext) -> Any:
        if call.incoming or call.kind != "call" or _streams_an_argument(call):
            return await call_next(call)
        tries = 0
        while True:
            try:
                return await call_next(call)
            except Exception as exc:
                tries += 1
                delay = backoff * 2 ** (tries - 1)
                timeout = call.timeout
                if (
                    tries == attempts
                    or not retryable(call, exc)
                    or (timeout is not None and timeout <= delay)
                ):
                    raise
                log.debug("retrying %s after %r (try %d)", call.method, exc, tries + 1)
            await asyncio.sleep(delay)

    return retrying_middleware


def _streams_an_argument(call: Call) -> bool:
    """Whether one of the call's arguments is an async iterable (sent as a stream)."""
    return any(hasattr(arg, "__aiter__") for arg in call.args)
