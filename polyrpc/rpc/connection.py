"""Remote calls on the session: dispatch, errors, proxies, callbacks both ways, streaming.

Wire usage (see docs/protocol.md): a REQUEST's method is ``Service.method`` and its
payload ``[args, kwargs]`` in the session codec. Results come back as RESPONSE or
ERROR. Streamed results are STREAM_ITEM frames closed by STREAM_END; the caller
grants credit (CREDIT frames) so a slow consumer stops a fast producer. A streamed
argument flows the other way on the same sequence id. Clients number exchanges
odd and servers even, so a sequence id always names one exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CallTimeout, ConnectionLost, MessageTooLarge, ProtocolError, RemoteError
from ..session.session import (
    BYTES_LIKE,
    PAUSE_BUSY,
    Session,
    SessionConfig,
    result_too_large,
)
from ..stream.trait import Buffer, Stream
from ..wire.codecs import PayloadTooComplex, decode_error_code
from ..wire.frames import FLAG_ARG_STREAM, FLAG_STREAM, Frame, Kind, encode_frame
from .eager import EagerServer, coroutine_step
from .middleware import Call, CallNext, Middleware, compose
from .services import Method, ServiceRegistry

log = logging.getLogger("polyrpc")

STREAM_CREDIT = 32
"""Items a stream's producer may send ahead of its consumer."""
_STREAM_ITEM, _STREAM_END, _CREDIT, _CANCEL, _REQUEST, _RESPONSE, _ERROR = (
    int(Kind.STREAM_ITEM),
    int(Kind.STREAM_END),
    int(Kind.CREDIT),
    int(Kind.CANCEL),
    int(Kind.REQUEST),
    int(Kind.RESPONSE),
    int(Kind.ERROR),
)
_context: contextvars.ContextVar[tuple[RpcConnection, Frame, float]] = contextvars.ContextVar(
    "polyrpc_call"
)
"""(connection, request frame, perf_counter when handling began) of the call being handled:
a tuple because it is set for every call and a handler rarely asks for its context."""


class CallContext:
    """What a handler knows about the call it is serving (see :func:`current_context`).

    It only keeps references; the rest is derived when asked for.
    """

    __slots__ = ("_started", "connection", "frame")

    def __init__(self, connection: RpcConnection, frame: Frame, started: float) -> None:
        self.connection = connection
        self.frame = frame
        self._started = started

    @property
    def method(self) -> str:
        return self.frame.method

    @property
    def metadata(self) -> dict[str, str]:
        return self.frame.metadata

    @property
    def deadline(self) -> float | None:
        """Seconds since the epoch after which the caller stops waiting, if it set a timeout."""
        timeout = self.frame.metadata.get("timeout")
        if timeout is None:
            return None
        try:
            return time.time() - (time.perf_counter() - self._started) + float(timeout)
        except ValueError:
            return None

    @property
    def peer(self) -> Any:
        return self.connection.peer

    @property
    def transport(self) -> str:
        return self.connection.transport

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a service the caller registered, over the same connection (a callback)."""
        return await self.connection.call(method, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<CallContext {self.method} from {self.peer!r} over {self.transport}>"


def current_context() -> CallContext:
    """The context of the call being handled; RuntimeError outside a handler."""
    try:
        return CallContext(*_context.get())
    except LookupError:
        raise RuntimeError("polyrpc.current_context() is only available inside a handler") from None


class SyncRunner:
    """The threads sync handlers run in, off the event loop: ``workers`` run at once and at
    most ``queue`` more wait; beyond that a call is refused (code ``overloaded``), so blocked
    handlers cost bounded memory and delay only other sync handlers."""

    def __init__(self, workers: int = 32, queue: int = 1024) -> None:
        if workers < 1 or queue < 0:
            raise ValueError("sync_workers must be at least 1 and sync_queue at least 0")
        self.workers = workers
        self.queue = queue
        self._executor: ThreadPoolExecutor | None = None  # threads start on first use
        self._admitted = 0
        """Calls running or queued; changed from worker threads too, under the lock."""
        self._lock = threading.Lock()

    def submit(self, func: Callable[..., Any], args: list, kwargs: dict) -> asyncio.Future[Any]:
        """Run ``func(*args, **kwargs)`` in a worker thread, in a copy of the current context;
        RemoteError(code ``overloaded``) at once if the workers and the queue are full."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise RemoteError(
                    "RuntimeError",
                    f"the server is overloaded: all {self.workers} sync workers are busy "
                    f"and {self.queue} sync calls are queued",
                    "overloaded",
                )
            self._admitted += 1
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, "polyrpc-sync")
            context = contextvars.copy_context()
            work = self._executor.submit(context.run, functools.partial(func, *args, **kwargs))
        except BaseException:
            self._release(None)
            raise
        work.add_done_callback(self._release)  # run, failed or cancelled before it started
        return asyncio.wrap_future(work)

    def _release(self, _: ThreadFuture[Any] | None) -> None:
        with self._lock:
            self._admitted -= 1

    def shutdown(self) -> None:
        """Start no more threads; running handlers finish in the background."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_shared_sync_runner: SyncRunner | None = None


def shared_sync_runner() -> SyncRunner:
    """The runner of connections without their own (clients serving callbacks)."""
    global _shared_sync_runner
    if _shared_sync_runner is None:
        _shared_sync_runner = SyncRunner()
    return _shared_sync_runner


@dataclass
class RpcOptions:
    """Server-side behaviour of a connection's call handling."""

    services: ServiceRegistry = field(default_factory=ServiceRegistry)
    max_concurrent_calls: int = 1024
    """Calls from one peer handled at once; more are refused with code ``too_many_calls``."""
    inline_sync: bool = False
    """Run sync handlers on the event loop (fast, but they must not block) instead of threads."""
    send_tracebacks: bool = False
    sync: SyncRunner = field(default_factory=shared_sync_runner)
    """Where sync handlers run (calls and notifications) unless ``inline_sync``."""
    middleware: tuple[Middleware, ...] = ()
    """Wrapped around every call the connection makes and serves, outermost first."""


class _IncomingCall:
    """A call from the peer being handled here."""

    __slots__ = ("args_stream", "cancelled", "credit", "credit_event", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.credit = 0
        self.credit_event: asyncio.Event | None = None
        self.args_stream: _ItemQueue | None = None
        self.cancelled = False
        """True once the caller gave up (CANCEL) or the connection went: a CancelledError
        out of the handler is then that, not the handler's own failure."""

    def cancel(self, calls: dict[int, _IncomingCall], seq: int) -> None:
        """Stop the handler because its caller is gone; no reply is sent. ``calls`` forgets
        it once the task ends, even one cancelled before its first step (that never runs
        its own cleanup)."""
        self.cancelled = True
        task = self.task
        if task is not None and task.cancel():
            task.add_done_callback(functools.partial(self._ended, calls, seq))

    def _ended(self, calls: dict[int, _IncomingCall], seq: int, task: asyncio.Task[None]) -> None:
        """The cancelled task is over: forget the call, and the task (one cancelled before its
        first step keeps its CancelledError, whose traceback holds the handler's frame, which
        holds this call: a cycle only the cyclic GC would free)."""
        self.task = None
        if calls.get(seq) is self:
            calls.pop(seq, None)


class _ItemQueue:
    """Items of one stream as they arrive, handed out in order, with credit returned."""

    def __init__(self, connection: RpcConnection, seq: int, window: int) -> None:
        self.connection = connection
        self.seq = seq
        self.window = window
        self.items: deque[Any] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.consumed = 0
        self.waiter: asyncio.Future[None] | None = None

    def push(self, item: Any) -> None:
        if len(self.items) >= self.window * 2:
            raise ProtocolError(f"stream {self.seq}: the peer sent more items than its credit")
        self.items.append(item)
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        self.ended = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> Any:
        while not self.items:
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        item = self.items.popleft()
        self.consumed += 1
        if self.consumed >= self.window // 2 and not self.ended:
            grant, self.consumed = self.consumed, 0
            if not self.connection.is_closed:
                self.connection.send_frame(_CREDIT, self.seq, grant)
        return item


class ArgumentStream:
    """The async iterator a handler receives for an argument the caller streams."""

    def __init__(self, queue: _ItemQueue) -> None:
        self._queue = queue

    def __aiter__(self) -> ArgumentStream:
        return self

    async def __anext__(self) -> Any:
        return await self._queue.next()


class ResultStream:
    """The caller's side of a streaming call: ``async for item in client.stream(...)``.

    Leaving the loop early (break, exception) cancels the remote generator.
    """

    def __init__(
        self,
        connection: RpcConnection,
        method: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        metadata: dict[str, str] | None,
    ) -> None:
        self._connection = connection
        self._call = (method, args, kwargs, timeout, metadata)
        self._queue: _ItemQueue | None = None
        self._seq = 0
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def __aiter__(self) -> ResultStream:
        return self

    async def _start(self) -> _ItemQueue:
        method, args, kwargs, timeout, metadata = self._call
        conn = self._connection
        meta = {**(metadata or {}), "credit": str(STREAM_CREDIT)}
        seq, future, sender = await conn._send_call(
            method, args, kwargs, timeout, meta, FLAG_STREAM
        )
        self._seq, self._sender = seq, sender
        queue = _ItemQueue(conn, seq, STREAM_CREDIT)
        conn._result_streams[seq] = queue

        def finished(done: asyncio.Future[Frame]) -> None:
            conn._result_streams.pop(seq, None)
            if done.cancelled():
                queue.end(ConnectionLost("stream cancelled"))
            elif done.exception() is not None:
                queue.end(done.exception())
            else:
                frame = done.result()
                queue.end(
                    conn.reply_error(frame, method, timeout) if frame.kind == _ERROR else None
                )

        future.add_done_callback(finished)
        self._queue = queue
        return queue

    async def __anext__(self) -> Any:
        queue = self._queue or await self._start()
        try:
            return await queue.next()
        except StopAsyncIteration:
            self._closed = True
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the stream: the remote generator is cancelled if it is still running."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
        if self._queue is not None and not self._queue.ended:
            self._connection._result_streams.pop(self._seq, None)
            self._connection.cancel_request(self._seq)

    def __del__(self) -> None:
        # `async for ... break` drops the iterator without closing it: stop the remote side
        queue = self._queue
        if not self._closed and queue is not None and not queue.ended:
            self._closed = True
            with contextlib.suppress(Exception):
                self._connection._result_streams.pop(self._seq, None)
                self._connection.cancel_request(self._seq)

    async def __aenter__(self) -> ResultStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class MiddlewareStream:
    """``client.stream(...)`` through middleware: the chain runs when iteration starts, and
    the async iterator it returns (the :class:`ResultStream`, or a middleware's wrapper of
    it) gives the items."""

    def __init__(self, chain: CallNext, call: Call) -> None:
        self._chain = chain
        self._call = call
        self._items: AsyncIterator[Any] | None = None

    def __aiter__(self) -> MiddlewareStream:
        return self

    async def __anext__(self) -> Any:
        if self._items is None:
            self._items = aiter(await self._chain(self._call))
        return await anext(self._items)

    async def aclose(self) -> None:
        """Stop the stream (the remote generator is cancelled if it is still running)."""
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> MiddlewareStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ServiceProxy:
    """``client.proxy("Arith").mul(3, 4)``: attribute access builds method names."""

    def __init__(self, connection: RpcConnection, service: str) -> None:
        self._connection = connection
        self._service = service

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self._connection.call, f"{self._service}.{name}")

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service} via {self._connection!r}>"


class RpcConnection(Session):
    """A session that makes and serves remote calls (both sides may do both)."""

    __slots__ = (
        "_arg_senders",
        "_codec_id",
        "_decode_unchecked",
        "_encode_unchecked",
        "_incoming",
        "_max_calls",
        "_methods",
        "_oneway_bytes",
        "_result_streams",
        "_serving",
        "_tasks",
        "options",
        "services",
    )

    def __init__(
        self, stream: Stream, config: SessionConfig, *, is_client: bool, options: RpcOptions
    ) -> None:
        # what on_closed uses exists first: Session.__init__ replays what the stream already
        # delivered, and a peer may have closed it (e.g. a server refusing at once)
        self.options = options
        self.services = options.services
        self._incoming: dict[int, _IncomingCall] = {}
        self._result_streams: dict[int, _ItemQueue] = {}
        self._arg_senders: dict[int, _IncomingCall] = {}
        self._tasks: dict[asyncio.Task[Any], int] = {}
        """Notifications being handled, with their payload sizes."""
        self._oneway_bytes = 0
        """The payload bytes of the notifications being handled."""
        super().__init__(stream, config, is_client=is_client)
        # bound once: used for every call
        self._methods = self.services.methods
        self._max_calls = options.max_concurrent_calls
        self._codec_id = self.codec.id
        self._encode_unchecked, self._decode_unchecked = self.codec.unchecked
        self._serving: CallNext | None = None
        """The middleware chain around the calls this side serves, None without middleware."""
        if options.middleware:  # every request takes the Python path, through the chain
            self._serving = compose(options.middleware, self._handle_now)
        elif EagerServer is not None:  # the C accelerator serves the usual calls
            self._request_handler = EagerServer(self, self.on_request, _context)

    # ----------------------------------------------------------- calling
    def _encode_call(self, args: tuple, kwargs: dict) -> tuple[Buffer, int]:
        """(payload, codec id) of a call's arguments: a lone bytes-like argument travels raw
        (no encoding, no copy) when the peer understands that, the rest as ``[args, kwargs]``."""
        if (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], BYTES_LIKE)
            and "rawarg" in self.peer_features
        ):
            return args[0], 0
        try:
            return self._encode_unchecked((args, kwargs)), self._codec_id  # tuples go as lists
        except Exception as exc:
            raise _unsendable(exc) from None

    async def _send_call(
        self,
        method: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        metadata: dict[str, str] | None,
        flags: int = 0,
        first_streamed: int | None = None,
    ) -> tuple[int, asyncio.Future[Frame], asyncio.Task[None] | None]:
        """Start a call; a streamed argument (an async iterable) gets a sender task.
        ``first_streamed``: its index, when the caller's scan of ``args`` stopped there."""
        streamed = _streamed_argument(args, first_streamed)
        source: Any = None
        if streamed is not None:
            source = args[streamed]
            args = (*args[:streamed], None, *args[streamed + 1 :])
            metadata = {**(metadata or {}), "argstream": str(streamed)}
            flags |= FLAG_ARG_STREAM
        payload, codec = self._encode_call(args, kwargs)
        waiting = self.wait_before_request(len(payload))
        if waiting is not None:
            await waiting
        seq, future = self.begin_request(payload, method, metadata, timeout, flags, codec)
        sender = None
        if streamed is not None:
            state = _IncomingCall()
            state.credit = STREAM_CREDIT
            self._arg_senders[seq] = state
            sender = self.loop.create_task(self._send_argument_stream(seq, source, state, future))
            future.add_done_callback(lambda _: sender.cancel())
        return seq, future, sender

    async def _send_argument_stream(
        self,
        seq: int,
        source: AsyncIterable[Any],
        state: _IncomingCall,
        future: asyncio.Future[Frame],
    ) -> None:
        """Stream the argument; if producing it fails, the call fails at once with that
        error and the peer's handler is cancelled (its argument would never end)."""
        try:
            await self._pump_items(seq, source, state)
        except (ConnectionLost, asyncio.CancelledError):
            pass
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            self.cancel_request(seq)
        finally:
            self._arg_senders.pop(seq, None)

    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` ("Service.method") and return its result.

        Raises RemoteError for errors in the handler, CallTimeout after ``timeout``
        seconds (the handler is cancelled remotely too) and ConnectionLost.
        """
        # _encode_call, kept inline: calling it costs 1,424 more instructions per tcp/rpc round
        # trip (+4.2%), which with the shared write path would take this path past the 5%
        # the restructure may cost (bench/instructions.py, #19)
        streamed: int | None = None
        if (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], BYTES_LIKE)
            and "rawarg" in self.peer_features
        ):
            payload, codec = args[0], 0
        else:
            for index, arg in enumerate(args):
                if hasattr(arg, "__aiter__"):  # a streamed argument: _send_call starts its sender
                    streamed, payload, codec = index, b"", 0  # _send_call encodes the call itself
                    break
            else:
                try:
                    payload, codec = self._encode_unchecked((args, kwargs)), self._codec_id
                except Exception as exc:
                    raise _unsendable(exc) from None
        if streamed is not None:
            seq, future, _ = await self._send_call(
                method, args, kwargs, timeout, metadata, first_streamed=streamed
            )
        else:
            waiting = self.wait_before_request(len(payload))
            if waiting is not None:
                await waiting
            if (
                timeout is not None
                or metadata
                or not self._accepting
                or len(payload) > self._send_check  # size checks, compression
            ):
                seq, future = self.begin_request(payload, method, metadata, timeout, 0, codec)
            else:  # begin_request's work, kept inline for the usual call: calling begin_request
                # costs 3,300 more instructions per tcp/rpc round trip, +9.7% (client 22,430 ->
                # 25,693, +14.5%; bench/instructions.py, #19)
                seq = self._next_seq
                self._next_seq = seq + 2
                future = self._pending[seq] = self.loop.create_future()
                self._write(encode_frame(_REQUEST, seq, payload, method=method, codec=codec), False)
        # no wait for the stream to drain once written: this call's reply is the proof that it
        # arrived, waiting would hold a small call behind a bulk one's bytes, and the window
        # of calls in flight bounds what is queued
        try:
            reply = await future
        except BaseException:
            self.abandon_request(seq, future)
            del future  # it holds the error, whose traceback holds this frame: no cycle
            raise
        if reply.kind == _RESPONSE:
            if reply.codec == 0:
                return reply.payload
            return self._decode_payload(reply)
        raise self.reply_error(reply, method, timeout)

    def reply_error(self, frame: Frame, method: str, timeout: float | None) -> Exception:
        """The error an ERROR reply stands for: CallTimeout if the server noticed the deadline
        first (the same outcome as our own timer, whichever wins), else the RemoteError."""
        error = self.remote_error(frame)
        if error.code == "deadline_exceeded" and timeout is not None:
            return CallTimeout(f"{method} timed out after {timeout:g}s")
        return error

    def notify(self, method: str, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, None]:
        """Call ``method`` one-way: no reply, errors are only logged by the peer."""
        return self._notify_with(method, args, kwargs, None)

    async def _notify_with(
        self, method: str, args: Sequence[Any], kwargs: dict, metadata: dict[str, str] | None
    ) -> None:
        """Send a notification with this metadata (middleware may have added some)."""
        payload, codec = self._encode_call(tuple(args), kwargs)
        self.send_oneway(payload, method=method, metadata=metadata, codec=codec)
        if self.byte_stream.writing_paused:
            await self.wait_writable()

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> ResultStream | MiddlewareStream:
        """Iterate the items a streaming method (an async generator) yields."""
        return ResultStream(self, method, args, kwargs, timeout, metadata)

    def proxy(self, service: str) -> ServiceProxy:
        """An object whose methods call ``service``'s: ``await proxy.mul(3, 4)``."""
        return ServiceProxy(self, service)

    def register(self, obj: Any, name: str | None = None) -> list[str]:
        """Expose ``obj`` to the peer on this connection (callbacks)."""
        return self.services.register(obj, name)

    # ---------------------------------------------------------- serving
    def on_request(self, frame: Frame) -> None:
        """Serve a call. An async handler's first step runs right here: most finish
        without waiting on anything and then need no task at all (Python 3.12's eager
        tasks, done by hand for 3.11); only one that suspends gets a task. The C
        accelerator's EagerServer does the same for the usual calls and hands the rest
        here; this is also its reference."""
        seq = frame.seq
        if len(self._incoming) >= self._max_calls:
            self._refuse_busy(seq)
            return
        try:
            method = self._methods.get(frame.method) or self.services.lookup(frame.method)
            args, kwargs = self._decode_arguments(frame)
        except RemoteError as exc:
            self.respond_error(seq, exc, exc.code)
            return
        except ProtocolError as exc:
            self.respond_error(seq, exc, decode_error_code(exc))
            return
        if method.kind != "async" or frame.flags or "timeout" in frame.metadata:
            self._start_call(seq, method, args, kwargs, frame)
            return
        started = time.perf_counter()
        token = _context.set((self, frame, started))
        try:
            try:
                if self._serving is None:
                    coro = method.func(*args, **kwargs)
                else:  # the middleware chain's first step runs eagerly, as a handler's would
                    coro = self._serving(self._incoming_call(args, kwargs, frame, started, "call"))
                finished, result = coroutine_step(coro)
            except BaseException as exc:  # no task yet: a CancelledError is the handler's own
                self._report_failure(seq, method, exc, started, args, kwargs)
                return
            if not finished:
                self._continue_eagerly(seq, method, coro, result, started)
                return
        finally:
            _context.reset(token)
        self._report_success(seq, method, result, started)

    def _continue_eagerly(
        self, seq: int, method: Method, coro: Any, waiting_on: Any, started: float
    ) -> None:
        """A handler suspended in its eager first step: the rest runs in a task whose context
        carries the call context (call this while it is set)."""
        call = _IncomingCall()
        if not self._register_call(seq, call):
            coro.close()
            return
        call.task = self.loop.create_task(
            self._finish_eagerly(seq, call, method, coro, waiting_on, started),
            context=contextvars.copy_context(),
        )

    def _register_call(self, seq: int, call: _IncomingCall) -> bool:
        """Track ``call`` under ``seq``; a peer reusing the seq of a call still running breaks
        the protocol (the running call would be orphaned: its task collected mid-await)."""
        if seq in self._incoming:
            self._protocol_failure(ProtocolError(f"REQUEST {seq} reuses the seq of a running call"))
            return False
        self._incoming[seq] = call
        return True

    def _start_call(self, seq: int, method: Method, args: list, kwargs: dict, frame: Frame) -> None:
        """Serve every call but an eager async one: inline sync, streams, deadlines, threads."""
        flags = frame.flags
        inline = method.kind == "sync" and self.options.inline_sync
        if inline and not flags and "timeout" not in frame.metadata and self._serving is None:
            self._call_inline(seq, method, args, kwargs, frame)
            return
        call = _IncomingCall()
        if not self._register_call(seq, call):
            return
        if flags & FLAG_ARG_STREAM:
            try:
                index = int(frame.metadata.get("argstream", "-1"))
            except ValueError:
                index = -1
            if not 0 <= index < len(args):
                del self._incoming[seq]
                self.respond_error(
                    seq, ProtocolError("streamed argument index out of range"), "bad_request"
                )
                return
            call.args_stream = _ItemQueue(self, seq, STREAM_CREDIT)
            args[index] = ArgumentStream(call.args_stream)
        call.task = self.loop.create_task(self._run_call(seq, call, method, args, kwargs, frame))

    def _refuse_busy(self, seq: int) -> None:
        limit = self._max_calls
        error = RemoteError(
            "RuntimeError",
            f"too many concurrent calls on this connection (limit {limit})",
            "too_many_calls",
        )
        self.respond_error(seq, error, error.code)

    def _decode_payload(self, frame: Frame) -> Any:
        """:meth:`decode` for the calls' hot paths (one call level for the usual codec)."""
        if frame.codec != self._codec_id:
            return self.decode(frame)
        try:
            return self._decode_unchecked(frame.payload)
        except PayloadTooComplex:
            raise
        except Exception as exc:
            raise ProtocolError(f"undecodable {self.codec.name} payload: {exc}") from None

    def _decode_arguments(self, frame: Frame) -> tuple[list, dict]:
        body = self._decode_payload(frame)
        if frame.codec == 0:  # a lone bytes argument, sent raw (decoded as bytes)
            return [body], {}
        if type(body) is list and len(body) == 2:
            args, kwargs = body
            if type(args) is list and type(kwargs) is dict:
                return args, kwargs
        raise ProtocolError("a call's payload must be [args, kwargs]")

    def _call_inline(
        self, seq: int, method: Method, args: list, kwargs: dict, frame: Frame
    ) -> None:
        started = time.perf_counter()
        token = _context.set((self, frame, started))
        try:
            result = method.func(*args, **kwargs)
        except BaseException as exc:
            self._report_failure(seq, method, exc, started, args, kwargs)
            return
        finally:
            _context.reset(token)
        self._report_success(seq, method, result, started)

    async def _finish_eagerly(
        self,
        seq: int,
        call: _IncomingCall,
        method: Method,
        coro: Any,
        waiting_on: Any,
        started: float,
    ) -> None:
        """Drive a handler coroutine that suspended during its eager first step."""
        try:
            while True:
                try:
                    if waiting_on is None:
                        await asyncio.sleep(0)  # a bare yield: give the loop a turn
                    else:
                        # the handler's own yield marked it; a task would clear the mark
                        waiting_on._asyncio_future_blocking = False
                        await waiting_on
                except BaseException as exc:  # CancelledError included: the handler decides
                    waiting_on = coro.throw(exc)
                else:
                    waiting_on = coro.send(None)
        except StopIteration as done:
            result = done.value
        except BaseException as exc:
            self._handler_failed(seq, call, method, exc, started)
            return
        finally:
            self._incoming.pop(seq, None)
        # (only the StopIteration branch gets here, with result bound)
        self._report_success(seq, method, result, started)  # type: ignore[possibly-undefined]

    def _report_success(self, seq: int, method: Method, result: Any, started: float) -> None:
        method.stats.record(time.perf_counter() - started, False)
        self.respond(seq, result)

    def _report_failure(
        self,
        seq: int,
        method: Method,
        exc: BaseException,
        started: float,
        args: list | None = None,
        kwargs: dict | None = None,
    ) -> None:
        """Answer a call whose handler raised: an Exception (or a CancelledError that is not
        the caller's) is ``handler_error``; any other BaseException (SystemExit,
        KeyboardInterrupt...) is ``internal_error``, logged, and ends nothing else."""
        method.stats.record(time.perf_counter() - started, True)
        # from the exception itself: the C call server reports it outside an except block
        text = "".join(traceback.format_exception(exc)) if self.options.send_tracebacks else None
        if isinstance(exc, TypeError) and args is not None:
            exc = method.binding_error(args, kwargs or {}) or exc
        if isinstance(exc, RemoteError):
            code = exc.code
        elif isinstance(exc, Exception | asyncio.CancelledError):
            code = "handler_error"
        else:
            code = "internal_error"
            log.error("handler %s raised %s; answered as internal_error", method.name, repr(exc))
        self.respond_error(seq, exc, code, text)

    def _handler_failed(
        self,
        seq: int,
        call: _IncomingCall,
        method: Method,
        exc: BaseException,
        started: float,
        args: list | None = None,
        kwargs: dict | None = None,
    ) -> None:
        """A handler running in a task raised: a CancelledError is the caller's cancel (or the
        connection's end, or this task's own cancellation) only if one happened; then nobody
        waits for an answer. Anything else is answered."""
        if isinstance(exc, asyncio.CancelledError) and (call.cancelled or _task_cancelling()):
            method.stats.record(time.perf_counter() - started, True)
            return
        self._report_failure(seq, method, exc, started, args, kwargs)

    async def _run_call(
        self,
        seq: int,
        call: _IncomingCall,
        method: Method,
        args: list,
        kwargs: dict,
        frame: Frame,
    ) -> None:
        started = time.perf_counter()
        _context.set((self, frame, started))
        deadline = CallContext(self, frame, started).deadline
        timer = asyncio.timeout(None if deadline is None else max(0.0, deadline - time.time()))
        wants_stream = bool(frame.flags & FLAG_STREAM)
        try:
            async with timer:
                if method.kind == "stream" or wants_stream:
                    if self._serving is None:
                        items = await self._open_results(method, args, kwargs, frame)
                    else:
                        served = self._incoming_call(args, kwargs, frame, started, "stream")
                        items = await self._serving(served)
                    await self._send_results(seq, call, method, items, frame)
                    method.stats.record(time.perf_counter() - started, False)
                    return
                if self._serving is not None:
                    result = await self._serving(
                        self._incoming_call(args, kwargs, frame, started, "call")
                    )
                elif method.kind == "async":
                    result = await method.func(*args, **kwargs)
                else:
                    result = await self.options.sync.submit(method.func, args, kwargs)
        except TimeoutError as exc:
            # the deadline's own expiry, or a TimeoutError of the handler's (an inner wait_for)
            error: BaseException = exc
            if timer.expired():
                error = RemoteError(
                    "TimeoutError", f"{method.name} passed its deadline", "deadline_exceeded"
                )
            self._report_failure(seq, method, error, started)
            return
        except BaseException as exc:
            self._handler_failed(seq, call, method, exc, started, args, kwargs)
            return
        finally:
            self._incoming.pop(seq, None)
        self._report_success(seq, method, result, started)

    def _incoming_call(
        self, args: list, kwargs: dict, frame: Frame, started: float, kind: str
    ) -> Call:
        """The :class:`Call` the middleware of a call served here sees."""
        served = (self, frame, started)
        deadline = CallContext(*served).deadline if "timeout" in frame.metadata else None
        return Call(frame.method, args, kwargs, frame.metadata, kind, self, deadline, served)

    def _handle_now(self, call: Call) -> Awaitable[Any]:
        """The innermost step of the calls served here through middleware: start the handler
        of ``call.method`` and return what to await for its result (an async handler's own
        coroutine: no extra level; a stream: its items, which the chain's caller sends)."""
        method = self._methods.get(call.method) or self.services.lookup(call.method)
        args, kwargs = call.args, call.kwargs
        if call.kind == "stream":
            context = call.context
            assert context is not None  # an incoming call always has one
            return self._open_results(method, args, kwargs, context.frame)
        if method.kind == "sync" and not self.options.inline_sync:
            return self.options.sync.submit(method.func, args, kwargs)
        result = method.func(*args, **kwargs)
        return result if hasattr(result, "__await__") else _ready(result)

    async def _open_results(self, method: Method, args: list, kwargs: dict, frame: Frame) -> Any:
        """Call a streaming handler: what it returns (or its coroutine returns) is streamed."""
        if not frame.flags & FLAG_STREAM:
            raise RemoteError(
                "TypeError",
                f"{method.name} is a streaming method; call it with client.stream()",
                "stream_mismatch",
            )
        produced = method.func(*args, **kwargs)
        if hasattr(produced, "__await__"):
            produced = await produced
        return produced

    async def _send_results(
        self, seq: int, call: _IncomingCall, method: Method, produced: Any, frame: Frame
    ) -> None:
        """Stream ``produced`` (an async or plain iterable) to the caller, paced by its credit."""
        if not isinstance(produced, AsyncIterable | Iterable):
            raise RemoteError(
                "TypeError",
                f"{method.name} did not return an iterable to stream",
                "stream_mismatch",
            )
        try:
            call.credit = int(frame.metadata.get("credit", str(STREAM_CREDIT)))
        except ValueError:
            call.credit = STREAM_CREDIT
        iterator = produced if isinstance(produced, AsyncIterable) else _aiter_sync(produced)
        try:
            await self._pump_items(seq, iterator, call, results=True)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump_items(
        self, seq: int, items: AsyncIterable[Any], state: _IncomingCall, results: bool = False
    ) -> None:
        """Send ``items`` as STREAM_ITEMs, each paid for with the consumer's credit, then END.
        An item over the peer's limit ends the stream: MessageTooLarge, or for ``results``
        (a handler's stream) the RemoteError ``result_too_large`` the caller gets."""
        async for item in items:
            await self._spend_credit(state)
            try:
                self.send_frame(_STREAM_ITEM, seq, item)
            except MessageTooLarge as exc:
                if results:
                    raise result_too_large(exc) from None
                raise
            if self.byte_stream.writing_paused:
                await self.wait_writable()
        self.send_frame(_STREAM_END, seq)

    async def _spend_credit(self, state: _IncomingCall) -> None:
        """Wait until the consumer granted credit for one more item, then use it."""
        while state.credit <= 0:
            if self.is_closed:
                raise self.lost_error()
            if state.credit_event is None:
                state.credit_event = asyncio.Event()
            state.credit_event.clear()
            await state.credit_event.wait()
        state.credit -= 1

    def on_oneway(self, frame: Frame) -> None:
        if not frame.method:
            log.debug("ignoring a plain message on an RPC connection")
            return
        try:
            method = self.services.lookup(frame.method)
            args, kwargs = self._decode_arguments(frame)
            mismatch = method.binding_error(args, kwargs)
            if mismatch is not None:
                raise mismatch
        except (RemoteError, ProtocolError) as exc:
            log.warning("notification %s from %s dropped: %s", frame.method, self.peer, exc)
            return
        task = self.loop.create_task(self._run_notification(method, args, kwargs, frame))
        size = len(frame.payload)
        self._tasks[task] = size
        self._oneway_bytes += size
        task.add_done_callback(self._notification_done)
        # notifications share the calls' window; over it (or over the inbox budget in bytes)
        # nothing more is read from this peer until its handlers catch up
        if (
            len(self._tasks) + len(self._incoming) >= self._max_calls
            or self._oneway_bytes > self.config.max_inbox_bytes
        ):
            self.pause_reading(PAUSE_BUSY)

    def _notification_done(self, task: asyncio.Task[Any]) -> None:
        self._oneway_bytes -= self._tasks.pop(task, 0)
        if (
            self._paused & PAUSE_BUSY
            and len(self._tasks) <= self._max_calls // 2
            and self._oneway_bytes <= self.config.max_inbox_bytes // 2
        ):
            self.resume_reading(PAUSE_BUSY)

    async def _run_notification(
        self, method: Method, args: list, kwargs: dict, frame: Frame
    ) -> None:
        """Run a notification's handler (a sync one in the sync threads); failures are logged."""
        started = time.perf_counter()
        _context.set((self, frame, started))
        try:
            if self._serving is not None:
                await self._serving(self._incoming_call(args, kwargs, frame, started, "notify"))
            elif method.kind == "sync" and not self.options.inline_sync:
                try:
                    running = self.options.sync.submit(method.func, args, kwargs)
                except RemoteError as exc:  # the sync queue is full: nobody to tell but the log
                    log.warning("notification %s from %s dropped: %s", method.name, self.peer, exc)
                    return
                await running
            else:
                result = method.func(*args, **kwargs)
                if hasattr(result, "__await__"):
                    await result
        except BaseException as exc:
            method.stats.record(time.perf_counter() - started, True)
            if not (isinstance(exc, asyncio.CancelledError) and _task_cancelling()):
                log.error("notification %s failed", method.name, exc_info=exc)
            return
        method.stats.record(time.perf_counter() - started, False)

    def on_frame(self, frame: Frame) -> None:
        kind, seq = frame.kind, frame.seq
        own = self.is_own_seq(seq)
        if kind == _CANCEL:
            call = self._incoming.get(seq)
            if call is not None:
                call.cancel(self._incoming, seq)
        elif kind == _CREDIT:
            state = self._arg_senders.get(seq) if own else self._incoming.get(seq)
            if state is not None:
                grant = self.decode(frame)
                if not isinstance(grant, int) or grant <= 0:
                    raise ProtocolError("CREDIT must carry a positive integer")
                state.credit += grant
                if state.credit_event is not None:
                    state.credit_event.set()
        elif kind == _STREAM_ITEM:
            queue = self._result_streams.get(seq) if own else self._args_queue(seq)
            if queue is not None:
                queue.push(self.decode(frame))
        elif kind == _STREAM_END:
            if own:
                queue = self._result_streams.pop(seq, None)
                future = self.finish_request(seq)
                if future is not None and not future.done():
                    future.set_result(frame)
                if queue is not None:
                    queue.end()
            else:
                queue = self._args_queue(seq)
                if queue is not None:
                    queue.end()

    def _args_queue(self, seq: int) -> _ItemQueue | None:
        call = self._incoming.get(seq)
        return call.args_stream if call is not None else None

    def incoming_tasks(self) -> list[asyncio.Future[Any]]:
        calls = [call.task for call in self._incoming.values() if call.task is not None]
        return calls + list(self._tasks)

    def on_abandoned(self) -> None:
        """The peer went away without a goodbye: its calls and notifications stop now."""
        for seq, call in list(self._incoming.items()):
            call.cancel(self._incoming, seq)
        for task in list(self._tasks):
            task.cancel()

    def on_closed(self, exc: Exception | None) -> None:
        lost = self.lost_error()
        self.on_abandoned()
        for call in list(self._incoming.values()):
            if call.args_stream is not None:
                call.args_stream.end(lost)
        for queue in list(self._result_streams.values()):
            queue.end(lost)
        self._result_streams.clear()
        for state in self._arg_senders.values():
            if state.credit_event is not None:
                state.credit_event.set()


class MiddlewareConnection(RpcConnection):
    """An RpcConnection whose calls, notifications and streams go through the middleware in
    its options too (the plain class serves through them only), so the plain class's call
    path has no check for middleware at all."""

    __slots__ = ("_calling",)

    def __init__(
        self, stream: Stream, config: SessionConfig, *, is_client: bool, options: RpcOptions
    ) -> None:
        if not options.middleware:
            raise ValueError("a MiddlewareConnection needs middleware (else use RpcConnection)")
        self._calling = compose(options.middleware, self._call_now)
        super().__init__(stream, config, is_client=is_client, options=options)

    def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, Any]:
        """:meth:`RpcConnection.call` through the middleware. Not a coroutine function of its
        own: it returns the outermost middleware's coroutine (one level less per call)."""
        call = self._outgoing(method, args, kwargs, metadata, timeout)
        return self._calling(call)  # type: ignore[return-value]  # a middleware is async

    async def notify(self, method: str, *args: Any, **kwargs: Any) -> None:
        await self._calling(self._outgoing(method, args, kwargs, None, None, "notify"))

    def stream(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> ResultStream | MiddlewareStream:
        call = self._outgoing(method, args, kwargs, metadata, timeout, "stream")
        return MiddlewareStream(self._calling, call)

    def _outgoing(
        self,
        method: str,
        args: tuple,
        kwargs: dict,
        metadata: dict[str, str] | None,
        timeout: float | None,
        kind: str = "call",
    ) -> Call:
        """The :class:`Call` the middleware of a call made here sees."""
        deadline = None if timeout is None else time.time() + timeout
        return Call(method, list(args), kwargs, dict(metadata or {}), kind, self, deadline)

    def _call_now(self, call: Call) -> Awaitable[Any]:
        """The innermost step of the calls made here through middleware: what to await to send
        ``call`` and get its result (a notification: None; a stream: its started
        :class:`ResultStream`). A call is the plain class's, with its fast path."""
        deadline, timeout = call.deadline, None
        if deadline is not None:  # to the millisecond: the deadlines' own resolution is 10 ms
            timeout = round(deadline - time.time(), 3)
            if timeout <= 0:
                raise CallTimeout(f"{call.method} passed its deadline before it was sent")
        metadata = call.metadata or None
        if call.kind == "call":
            return RpcConnection.call(
                self, call.method, *call.args, timeout=timeout, metadata=metadata, **call.kwargs
            )
        if call.kind == "stream":
            return self._start_stream(call.method, call.args, call.kwargs, timeout, metadata)
        return self._notify_with(call.method, call.args, call.kwargs, metadata)

    async def _start_stream(
        self,
        method: str,
        args: list,
        kwargs: dict,
        timeout: float | None,
        metadata: dict[str, str] | None,
    ) -> ResultStream:
        """A streaming call's request, sent: the stream its items come through."""
        stream = ResultStream(self, method, tuple(args), kwargs, timeout, metadata)
        await stream._start()
        return stream


def _streamed_argument(args: tuple, first: int | None = None) -> int | None:
    """The index of the argument to stream (an async iterable), None if there is none; only
    one may be. ``first``: that index when a scan found it already (only the rest is looked at)."""
    for index in range(0 if first is None else first + 1, len(args)):
        if hasattr(args[index], "__aiter__"):
            if first is not None:
                raise TypeError("only one argument may be an async iterable (streamed)")
            first = index
    return first


def _task_cancelling() -> bool:
    """True if the running task itself was asked to stop (not just one it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _unsendable(exc: Exception) -> TypeError:
    return TypeError(f"cannot send these arguments: {exc}")


async def _ready(value: Any) -> Any:
    """``value`` as an awaitable (a sync handler run inline, through middleware)."""
    return value


async def _aiter_sync(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item
