"""The session's asyncio adapter: a :class:`~polyrpc.session.core.SessionCore` run over a
Stream on an event loop.

The core holds the protocol; this adapter gives it the loop's time and one timer, sends what
it writes through the stream (batching what is written in one loop turn), turns its
requests' replies into futures, waits (handshake, a slot in the window, stream room, a
graceful close) and pauses reading. Whatever is above it (the message API, RPC) subclasses it
and handles requests, one-way messages and the other frame kinds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Collection, Sequence
from typing import Any, Self

from ..errors import ConnectionLost, HandshakeError, PolyrpcError, ProtocolError
from ..stream.trait import Buffer, BufferedReceiver, Stream
from ..wire.frames import Frame
from .core import (
    BYTES_LIKE,
    FEATURES,
    SessionConfig,
    SessionCore,
    error_payload,
    result_too_large,
)

__all__ = [
    "BYTES_LIKE",
    "FEATURES",
    "PAUSE_BUSY",
    "PAUSE_INBOX",
    "PAUSE_REPLIES",
    "Session",
    "SessionConfig",
    "error_payload",
    "result_too_large",
]

log = logging.getLogger("polyrpc")

FLUSH_BUFFERS = 256
"""Queued buffers that trigger a write before the end of the loop turn."""
FLUSH_BYTES = 64 << 10
"""A buffer at least this big is written at once rather than batched."""
FAILURE_LINGER = 2.0
"""After a protocol error, how long the ERROR naming it may take to flush before the close."""
PAUSE_INBOX = 1
"""Why reading is paused: received one-way messages nobody took are over max_inbox_bytes."""
PAUSE_BUSY = 2
"""Why reading is paused: the peer's one-way messages keep handlers busy over the window."""
PAUSE_REPLIES = 4
"""Why reading is paused: the peer does not read what this side writes (serving side)."""


def _drop_frames(frames: list[Frame]) -> None:
    """Where a finished connection's decoder delivers: nowhere (see Session._release)."""


def _drop_frame(frame: Frame) -> None:
    """A finished connection serves no requests (see Session._release)."""


def _drop_error(exc: ProtocolError) -> None:
    """A finished connection reports no protocol errors (see Session._release)."""


class Session(SessionCore, BufferedReceiver):
    """One polyrpc connection. Create with :meth:`client` / :meth:`server` helpers of subclasses.

    It is its stream's receiver, a :class:`BufferedReceiver`: socket and kcp streams read
    straight into the core's frame decoder. Requests' waiters are futures resolved with
    their reply frames.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_handshake",
        "_resume_handle",
        "_slot_waiters",
        "_timer",
        "buffer_updated",
        "get_buffer",
        "loop",
        "opened_at",
    )

    def __init__(self, stream: Stream, config: SessionConfig, *, is_client: bool) -> None:
        self.byte_stream = stream
        self.loop = asyncio.get_running_loop()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        """The one timer: at the core's timer() (deadlines, heartbeat, idle timeout)."""
        self._resume_handle: asyncio.Handle | None = None
        self._handshake: asyncio.Future[None] = self.loop.create_future()
        self._closed: asyncio.Future[Exception | None] = self.loop.create_future()
        super().__init__(config, is_client=is_client, clock=self.loop.time)
        self._new_waiter = self.loop.create_future
        # the decoder's own methods are this receiver's BufferedReceiver members, which a socket
        # calls for every read: session methods calling them cost 2,081 more instructions per
        # tcp/rpc round trip, +6.1% (client +1,087, server +994; bench/instructions.py, #19)
        self.get_buffer = self._decoder.get_buffer
        self.buffer_updated = self._decoder.received
        self.opened_at = time.time()
        if not is_client:
            # a peer that does not read its replies is not served until it does
            stream.on_write_pressure = self._on_write_pressure
        stream.set_receiver(self)

    # ------------------------------------------------------------------ info
    @property
    def transport(self) -> str:
        """The transport's scheme (``tcp``, ``quic``...)."""
        return self.byte_stream.transport_name

    @property
    def peer(self) -> Any:
        """The peer's address as the transport reports it."""
        return self.byte_stream.get_extra_info("peer")

    @property
    def extra(self) -> dict[str, Any]:
        """Transport details: peer, local, tls_version, cipher, peer_cert, mtu..."""
        return self.byte_stream.extra

    @property
    def is_closed(self) -> bool:
        """True once the connection is gone (closed or lost)."""
        return self._closed.done()

    # ------------------------------------------------------------- handshake
    async def handshake(self) -> None:
        """Exchange HELLO frames; the client proposes, the server checks and answers."""
        if self.is_client:
            self.send_hello()
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), self.config.handshake_timeout)
        except TimeoutError:
            self.abort(ConnectionLost("no polyrpc HELLO from the peer in time"))
            raise HandshakeError(
                f"the peer at {self.peer} did not complete the polyrpc handshake within "
                f"{self.config.handshake_timeout}s (is it a polyrpc server?)",
                "not_polyrpc",
            ) from None

    async def accept_handshake(self) -> bool:
        """Server side: complete the handshake; a failure is logged and only drops this peer."""
        try:
            await self.handshake()
        except PolyrpcError as exc:
            log.info("%s handshake with %s failed: %s", self.transport, self.peer, exc)
            return False
        return True

    def _handshake_completed(self) -> None:
        if self._replay_after_hello:  # in a turn of its own: the decoder is delivering now
            self._replay_after_hello = False
            self.loop.call_soon(self._decoder.received, 0)
        self._arm_timer()
        self._handshake.set_result(None)
        self.byte_stream.handshake_done()  # last: it may fail the stream (rdma's locked memory)

    def _handshake_failed(self, exc: Exception) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()

    def _route_all(self) -> None:
        """After the handshake, while reading: the decoder resolves replies itself while
        nobody waits for a slot, and a request that arrives alone is served at once (its
        reply leaves unbatched). Where compression was negotiated every frame goes through
        the core's inflating dispatch instead (those shortcuts would hand on compressed
        payloads)."""
        if self._compression is not None:
            super()._route_all()
            return
        self._decoder.route(
            self._dispatch,
            self._protocol_failure,
            self._pending,
            self._slot_waiters,
            self._request_handler,
        )

    # ------------------------------------------------------------ the timer
    def _arm_timer(self) -> None:
        """Set the one timer at the core's next deadline (earlier than any set now)."""
        when = self.timer()
        timer = self._timer
        if when is None or self._gone or (timer is not None and timer.when() <= when):
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.handle_timer(self.loop.time())
        self._arm_timer()

    def _deadline_added(self) -> None:
        self._arm_timer()

    # ---------------------------------------------------------- receive side
    def _reply_received(self, waiter: asyncio.Future[Frame], frame: Frame) -> None:
        if not waiter.done():
            waiter.set_result(frame)
        if self._slot_waiters:
            self._wake_slot()

    def _request_failed(self, seq: int, waiter: asyncio.Future[Frame], exc: Exception) -> None:
        if waiter.done():
            return
        waiter.set_exception(exc)
        if self._slot_waiters:
            self._wake_slot()

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the peer for ``reason`` (a PAUSE_* bit) until it is resumed.

        Frames already read but not handled yet wait too (everything goes through
        :meth:`_dispatch`, which holds them), so nothing more is served from this peer.
        """
        if not self._paused and not self._gone:
            self.byte_stream.pause_reading()
            if self._handshaken:
                self._decoder.route(self._frames_receiver(), self._protocol_failure)
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        """``reason`` for pausing is gone; reading resumes (soon) once no reason is left."""
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self._resume_handle is None and not self._gone:
            # in a loop turn of its own: the held frames may write, or pause again
            self._resume_handle = self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        if self._paused or self._gone:
            return
        held, self._held = self._held, []
        if held:
            self._dispatch(held)
            if self._paused or self._gone:
                return
        if self._handshaken:
            self._route_all()
        self.byte_stream.resume_reading()

    def _on_write_pressure(self, paused: bool) -> None:
        if paused:
            self.pause_reading(PAUSE_REPLIES)
        else:
            self.resume_reading(PAUSE_REPLIES)

    def _end_after_failure(self) -> None:
        self._flush()
        self.byte_stream.pause_reading()  # nothing more is read while the ERROR flushes
        self.loop.create_task(self._close_after_failure())

    async def _close_after_failure(self) -> None:
        """Close once the ERROR is flushed (abort if that takes longer than FAILURE_LINGER)."""
        try:
            await asyncio.wait_for(self.byte_stream.close(), FAILURE_LINGER)
        except (TimeoutError, ConnectionLost):
            self.byte_stream.abort()

    def _close_soon(self) -> None:
        self.loop.create_task(self.close())

    def data_received(self, data: Buffer) -> None:
        """Bytes from a stream that hands them over: the decoder delivers the frames."""
        self._decoder.received_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The stream is gone: everything pending fails, the timers stop."""
        self._connection_ended(exc)
        for handle in (self._timer, self._flush_handle, self._resume_handle):
            if handle is not None:
                handle.cancel()
        if not self._closed.done():
            self._closed.set_result(exc)
        self.on_closed(exc)
        self._release()

    def _release(self) -> None:
        """Drop the references that close loops through this session (decoder routes, the
        call server, timers) so a finished connection is freed at once, without the cyclic GC."""
        reason = self.close_reason
        if reason is not None:  # kept, never raised again: the frames it was raised in go
            reason.__traceback__ = None
        self._decoder.route(_drop_frames, _drop_error)
        self._request_handler = _drop_frame
        self._timer = self._flush_handle = self._resume_handle = None

    def _fail_pending(self, exc: ConnectionLost) -> None:
        super()._fail_pending(exc)
        while self._slot_waiters:
            self._wake_slot()

    # ----------------------------------------------------- hooks for layers
    def on_request(self, frame: Frame) -> None:
        """A REQUEST arrived; answer with :meth:`respond` / :meth:`respond_error`."""
        self.respond_error(
            frame.seq, PolyrpcError("this endpoint does not answer requests"), "no_handler"
        )

    def on_oneway(self, frame: Frame) -> None:
        """A one-way message arrived."""

    def on_frame(self, frame: Frame) -> None:
        """Any other frame kind (CANCEL, STREAM_ITEM, STREAM_END, CREDIT)."""

    def on_abandoned(self) -> None:
        """The peer went away without a goodbye (or the connection is gone): stop the work
        done for it."""

    def on_goaway(self) -> None:
        """The peer announced a graceful close: it accepts no new requests."""

    def on_eof(self) -> None:
        """The peer finished sending; by default close once our own work is done."""
        self.loop.create_task(self.close())

    def on_closed(self, exc: Exception | None) -> None:
        """The connection is gone (``exc`` None after a clean local close)."""

    def incoming_tasks(self) -> Collection[asyncio.Future[Any]]:
        """The tasks handling the peer's requests now (graceful close waits for them)."""
        return ()

    # ------------------------------------------------------------ send side
    def _write(self, buffers: Sequence[Buffer], ordered: bool = True) -> None:
        """Send whole frames, batching whatever is written in the same loop turn.

        A frame goes out at once only when the connection is otherwise quiet (no
        other request in flight), which keeps a lone call's latency minimal; under
        load everything written in a loop turn, or while handling received frames,
        is collected and written together (one syscall instead of many).
        """
        if self._in_receive or self._flush_handle is not None or len(self._pending) > 1:
            out = self._out
            out += buffers
            if ordered:
                self._out_ordered = True
            if len(out) > FLUSH_BUFFERS or len(buffers[-1]) >= FLUSH_BYTES:
                self._flush()  # hand big batches to the stream now so its backpressure applies
            elif self._flush_handle is None and not self._in_receive:
                self._flush_handle = self.loop.call_soon(self._flush)
            return
        if self._gone:
            raise self.lost_error()
        self._send_now(buffers, ordered)
        if not self._pending and not self._decoder.serving_one:
            # a write outside any receive (a lone request's reply is not): batch whatever
            # else is written in this loop turn
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        out, self._out = self._out, []
        ordered, self._out_ordered = self._out_ordered, False
        if out and not self._gone:
            try:  # noqa: SIM105 - contextlib.suppress costs three calls on the hot path
                self._send_now(out, ordered)
            except ConnectionLost:
                pass  # on a broken stream connection_lost() reports it to everyone waiting

    def _send_now(self, buffers: Sequence[Buffer], ordered: bool) -> None:
        """Hand whole frames to the stream now, counting their bytes: a lone frame through
        the stream's ``write_now`` when it has one (no Python code of the stream runs)."""
        write_now = self.byte_stream.write_now
        if write_now is not None and len(buffers) == 1:
            self.bytes_out += len(buffers[0])
            write_now(buffers[0])
        else:
            self.bytes_out += sum(map(len, buffers))
            self.byte_stream.write(buffers, ordered=ordered)

    def _can_send(self) -> bool:
        return not (self._gone or self.byte_stream.is_closing)

    async def wait_writable(self) -> None:
        """Wait while the stream holds more than its high-water mark (backpressure)."""
        if self.byte_stream.writing_paused:
            try:
                await self.byte_stream.drain()
            except ConnectionLost:
                raise self.lost_error() from None

    def wait_before_request(self, size: int) -> Awaitable[None] | None:
        """What a request of ``size`` payload bytes must await before it is written, None
        when it may go now. The usual case makes no coroutine: awaiting one on every request
        (then begin_request in a coroutine of its own) cost the tcp row 2,776 instructions
        per round trip, +7.5%; this way 813, +2.2% (tcp/rpc: 513, +1.5%; bench/instructions.py,
        #19)."""
        if len(self._pending) >= self._max_in_flight or (
            self.byte_stream.writing_paused and size >= FLUSH_BYTES
        ):
            return self._wait_before_request(size)
        return None

    async def _wait_before_request(self, size: int) -> None:
        """A big request first waits for room in the stream (a small one never waits behind
        it), then any for a slot in the window, last: nothing awaits between the free slot
        and the write that follows."""
        if self.byte_stream.writing_paused and size >= FLUSH_BYTES:
            await self.wait_writable()
        if len(self._pending) >= self._max_in_flight:
            await self.wait_for_slot()

    def abandon_request(self, seq: int, future: asyncio.Future[Frame]) -> None:
        """The caller stopped waiting (cancelled, or sending failed): forget the request,
        tell the peer, and make sure the reply future holds no unretrieved error."""
        self.cancel_request(seq)
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # e.g. ConnectionLost set while the caller waited to write

    def finish_request(self, seq: int) -> asyncio.Future[Frame] | None:
        """Remove request ``seq`` from the window (for exchanges ended by other frames)."""
        future = self._pending.pop(seq, None)
        if future is not None and self._slot_waiters:
            self._wake_slot()
        return future

    async def wait_for_slot(self) -> None:
        """Wait until fewer than ``max_in_flight`` requests are pending (the window)."""
        while len(self._pending) >= self._max_in_flight:
            self._check_open()
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            await waiter

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---------------------------------------------------------------- closing
    async def close(self) -> None:
        """Graceful close: no new requests, let in-flight work finish, flush, then close."""
        if self._closed.done():
            return
        if not self._closing:
            try:
                self.start_close()
                give_up = self.loop.call_later(self.config.close_timeout, self._close_timed_out)
                try:
                    await self._wait_in_flight()
                finally:
                    give_up.cancel()
                if self._out:
                    self._flush()
                if not self._closed.done():
                    await self.byte_stream.close()
            except ConnectionLost:
                pass
        await asyncio.shield(self._closed)

    def _close_timed_out(self) -> None:
        self.abort(ConnectionLost("graceful close timed out; connection aborted"))

    async def _wait_in_flight(self) -> None:
        """Wait until no request is in flight either way, or the connection is gone: woken by
        each reply, each ended handler and the connection's end, never by a timer."""
        while self._slot_waiters:
            self._wake_slot()  # callers waiting for room fail now: nothing new goes out
        while not self._closed.done():
            handlers = self.incoming_tasks()
            if not (self._pending or handlers):
                return
            # while anyone waits in _slot_waiters every reply goes through _dispatch, whose
            # _wake_slot then wakes this waiter (the only one: no caller waits once closing)
            reply = self.loop.create_future()
            self._slot_waiters.append(reply)
            try:
                await asyncio.wait(
                    [reply, self._closed, *handlers], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if not reply.done():
                    self._slot_waiters.remove(reply)

    def abort(self, exc: Exception | None = None) -> None:
        """Drop the connection now; pending operations fail with ConnectionLost."""
        if self._closed.done():
            return
        if exc is not None and self.close_reason is None:
            self.close_reason = exc
        self.byte_stream.abort()

    async def wait_closed(self) -> Exception | None:
        """Wait until the connection is gone; returns why (None after a clean close)."""
        return await asyncio.shield(self._closed)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<{type(self).__name__} {self.transport} peer={self.peer!r} {state}>"
