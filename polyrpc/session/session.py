"""The session: one multiplexed, full-duplex polyrpc connection over any Stream.

It owns the frame decoder, the HELLO handshake, sequence ids, the window of
in-flight requests, batched writes, batched timeouts, heartbeats and the idle
timeout, and graceful close. Whatever is above it (the message API, RPC)
subclasses it and handles requests, one-way messages and the other frame kinds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from ..errors import (
    CallTimeout,
    ConnectionLost,
    HandshakeError,
    MessageTooLarge,
    PolyrpcError,
    ProtocolError,
    RemoteError,
)
from ..stream.trait import Buffer, BufferedReceiver, Stream, fresh_error
from ..wire.codecs import RAW, Codec, codec_by_id, codec_by_name
from ..wire.frames import (
    FLAG_REPLY,
    HEADER_SIZE,
    MIN_PEER_MAX_FRAME,
    VERSION,
    Frame,
    Kind,
    Limits,
    encode_frame,
    encode_metadata,
    encode_plain,
)
from .routing import RoutingDecoder
from .state import SessionState
from .timeouts import DeadlineWheel

log = logging.getLogger("polyrpc")

FEATURES = "cancel,stream,credit,goaway,rawarg"
"""What this implementation supports, announced in HELLO."""

# plain ints: compared on every frame
_REQUEST, _RESPONSE, _ERROR, _ONEWAY = (
    int(k) for k in (Kind.REQUEST, Kind.RESPONSE, Kind.ERROR, Kind.ONEWAY)
)
_HEARTBEAT, _HELLO, _GOAWAY, _CANCEL = (
    int(k) for k in (Kind.HEARTBEAT, Kind.HELLO, Kind.GOAWAY, Kind.CANCEL)
)
BYTES_LIKE = (bytes, bytearray, memoryview)
"""Payload types sent raw (codec 0): no encoding, no copy."""
FLUSH_BUFFERS = 256
"""Queued buffers that trigger a write before the end of the loop turn."""
FLUSH_BYTES = 64 << 10
"""A buffer at least this big is written at once rather than batched."""
DEFAULT_PEER_MAX_FRAME = Limits().max_frame
"""The receive limit assumed for a peer whose HELLO announces none (older versions)."""
SIZE_SLACK = 128 << 10
"""Room left for a frame's method name and metadata (a peer accepts 65 KiB of them by
default): payloads up to the peer's max_frame less this are sent without an exact size check."""
FAILURE_LINGER = 2.0
"""After a protocol error, how long the ERROR naming it may take to flush before the close."""
PAUSE_INBOX = 1
"""Why reading is paused: received one-way messages nobody took are over max_inbox_bytes."""
PAUSE_BUSY = 2
"""Why reading is paused: the peer's one-way messages keep handlers busy over the window."""
PAUSE_REPLIES = 4
"""Why reading is paused: the peer does not read what this side writes (serving side)."""


@dataclass
class SessionConfig:
    """Per-connection settings; the defaults suit most uses."""

    codec: str = "msgpack"
    limits: Limits = field(default_factory=Limits)
    max_in_flight: int = 128
    """Outgoing requests awaiting a reply at once; more callers wait for a slot."""
    heartbeat_interval: float = 5.0
    """Send a heartbeat when nothing was sent for this long (0: never)."""
    idle_timeout: float = 20.0
    """Declare the peer dead when nothing arrived for this long (0: never)."""
    handshake_timeout: float = 10.0
    close_timeout: float = 10.0
    """How long a graceful close waits for in-flight work before aborting."""
    max_inbox_bytes: int = 8 << 20
    """Unread received messages above this size pause reading (backpressure)."""
    token: str | None = None
    """Shared secret: a client sends it, a server requires it."""

    def __post_init__(self) -> None:
        codec_by_name(self.codec)
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.limits.max_frame < MIN_PEER_MAX_FRAME:
            raise ValueError(
                f"limits.max_frame must be at least {MIN_PEER_MAX_FRAME} bytes (the peer "
                f"refuses a smaller one), got {self.limits.max_frame}"
            )


def error_payload(exc: BaseException, code: str, traceback_text: str | None = None) -> dict:
    """The body of an ERROR frame describing ``exc`` (a RemoteError keeps its own fields)."""
    if isinstance(exc, RemoteError):
        body = {"type": exc.type_name, "message": exc.message, "code": exc.code}
    else:
        body = {"type": type(exc).__name__, "message": str(exc), "code": code}
    if traceback_text:
        body["traceback"] = traceback_text
    return body


def result_too_large(exc: MessageTooLarge) -> RemoteError:
    """What the caller gets for a result (reply or stream item) over its receive limit."""
    return RemoteError("MessageTooLarge", str(exc), "result_too_large")


def _drop_frames(frames: list[Frame]) -> None:
    """Where a finished connection's decoder delivers: nowhere (see Session._release)."""


def _drop_frame(frame: Frame) -> None:
    """A finished connection serves no requests (see Session._release)."""


def _drop_error(exc: ProtocolError) -> None:
    """A finished connection reports no protocol errors (see Session._release)."""


class Session(SessionState, BufferedReceiver):
    """One polyrpc connection. Create with :meth:`client` / :meth:`server` helpers of subclasses.

    It is its stream's receiver, a :class:`BufferedReceiver`: socket and kcp streams read
    straight into the frame decoder's buffer. Its :class:`SessionState` base holds the state
    the C call server uses on every reply (``byte_stream``, ``bytes_out``, ``_gone``,
    ``_send_check``, ``_in_receive``, ``_flush_handle``).
    """

    # slots: a session has more attributes than CPython's shared-key dicts hold (30),
    # so with a __dict__ every attribute access on the hot path would be a dict lookup
    __slots__ = (
        "__weakref__",
        "_accepting",
        "_closed",
        "_closing",
        "_deadline_timer",
        "_deadlines",
        "_decoder",
        "_handshake",
        "_handshaken",
        "_heartbeat_timer",
        "_held",
        "_last_recv",
        "_last_send",
        "_max_in_flight",
        "_next_seq",
        "_out",
        "_out_ordered",
        "_paused",
        "_peer_closing",
        "_peer_max_frame",
        "_pending",
        "_pending_info",
        "_refusal",
        "_request_handler",
        "_resume_handle",
        "_seen_in",
        "_seen_out",
        "_slot_waiters",
        "buffer_updated",
        "close_reason",
        "codec",
        "config",
        "get_buffer",
        "is_client",
        "loop",
        "opened_at",
        "peer_features",
        "peer_info",
    )

    def __init__(self, stream: Stream, config: SessionConfig, *, is_client: bool) -> None:
        self.byte_stream = stream
        self.config = config
        self.is_client = is_client
        self.codec: Codec = codec_by_name(config.codec)
        self.peer_features: set[str] = set()
        self.peer_info: dict[str, str] = {}
        self.loop = asyncio.get_running_loop()
        self._decoder = RoutingDecoder(config.limits, handshake=True)
        # the receiving side (StreamReceiver and BufferedReceiver, which socket and kcp
        # streams use to read straight into the decoder): the decoder hands the frames to _dispatch
        # itself, after the handshake resolving plain replies and serving lone requests
        self._decoder.route(self._dispatch, self._protocol_failure)
        # the decoder's own methods are this receiver's BufferedReceiver members, which a socket
        # calls for every read: session methods calling them cost 2,081 more instructions per
        # tcp/rpc round trip, +6.1% (client +1,087, server +994; bench/instructions.py, #19)
        self.get_buffer: Callable[[int], memoryview] = self._decoder.get_buffer
        self.buffer_updated: Callable[[int], object] = self._decoder.received
        self._next_seq = 1 if is_client else 2
        """Clients number their requests odd, servers even: a seq names one exchange."""
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._request_handler: Callable[[Frame], object] = self.on_request
        """Serves each REQUEST frame: on_request, or an accelerated equivalent."""
        self._pending_info: dict[int, tuple[str, float]] = {}
        self._max_in_flight = config.max_in_flight
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._out: list[Buffer] = []
        self._out_ordered = False
        self._flush_handle = None
        self._in_receive = False
        self._deadlines = DeadlineWheel()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._last_recv = self._last_send = self.loop.time()
        self._seen_in = self._seen_out = 0
        self._accepting = True
        """False once closing, closed or the peer is closing: no new requests."""
        self._handshake: asyncio.Future[None] = self.loop.create_future()
        self._handshaken = False
        """True once HELLO was exchanged (a flag: checked for every received frame)."""
        self._gone = False
        """True once the connection is lost (a flag: checked on every write)."""
        self._closed: asyncio.Future[Exception | None] = self.loop.create_future()
        self._closing = False
        self._peer_closing = False
        self.close_reason: Exception | None = None
        self._refusal: tuple[str, str] | None = None
        self._peer_max_frame = DEFAULT_PEER_MAX_FRAME
        """The largest frame the peer accepts (``max_frame`` in its HELLO)."""
        self._send_check = DEFAULT_PEER_MAX_FRAME - HEADER_SIZE - SIZE_SLACK
        """Payloads up to this size fit the peer's limit whatever the method and metadata:
        the send paths compare only this integer, and check bigger ones exactly."""
        self.bytes_out = 0
        self.opened_at = time.time()
        self._paused = 0
        """Why reading is paused: PAUSE_* bits, 0 while reading."""
        self._held: list[Frame] = []
        """Frames read before a pause but not handled yet: handled first when reading resumes."""
        self._resume_handle: asyncio.Handle | None = None
        if not is_client:
            # a peer that does not read its replies is not served until it does
            stream.on_write_pressure = self._on_write_pressure
        stream.set_receiver(self)

    # ------------------------------------------------------------------ info
    @property
    def bytes_in(self) -> int:
        """Bytes received on this connection."""
        return self._decoder.bytes_received

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

    @property
    def in_flight(self) -> int:
        """Outgoing requests awaiting a reply."""
        return len(self._pending)

    # ------------------------------------------------------------- handshake
    async def handshake(self) -> None:
        """Exchange HELLO frames; the client proposes, the server checks and answers."""
        if self.is_client:
            meta = {
                "version": str(VERSION),
                "codec": self.codec.name,
                "features": FEATURES,
                "max_frame": str(self.config.limits.max_frame),
            }
            if self.config.token is not None:
                meta["token"] = self.config.token
            self._write(encode_frame(_HELLO, 0, metadata=meta), ordered=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), self.config.handshake_timeout)
        except TimeoutError:
            self.abort(ConnectionLost("no polyrpc HELLO from the peer in time"))
            raise HandshakeError(
                f"the peer at {self.peer} did not complete the polyrpc handshake within "
                f"{self.config.handshake_timeout}s (is it a polyrpc server?)",
                "not_polyrpc",
            ) from None
        self._arm_heartbeat()

    async def accept_handshake(self) -> bool:
        """Server side: complete the handshake; a failure is logged and only drops this peer."""
        try:
            await self.handshake()
        except PolyrpcError as exc:
            log.info("%s handshake with %s failed: %s", self.transport, self.peer, exc)
            return False
        return True

    def _on_hello(self, frame: Frame) -> None:
        meta = frame.metadata
        if self._handshake.done():
            raise ProtocolError("HELLO received twice")
        if self.is_client:
            if not frame.flags & FLAG_REPLY:
                raise ProtocolError("expected a HELLO reply from the server")
            self.peer_features = set(meta.get("features", "").split(","))
            self.peer_info = dict(meta)
            self._set_peer_limit(meta)
            self._handshake_done()
            return
        problem = self._check_hello(meta)
        if problem is not None:
            reason, message = problem
            log.info("refusing %s connection from %s: %s", self.transport, self.peer, message)
            body = {"type": "HandshakeError", "message": message, "code": reason}
            self._write(
                encode_frame(_ERROR, 0, self.codec.encode(body), codec=self.codec.id), ordered=True
            )
            self._handshake.set_exception(HandshakeError(message, reason))
            self._handshake.exception()
            self.loop.create_task(self.close())
            return
        self.codec = codec_by_name(meta["codec"])
        self.peer_features = set(meta.get("features", "").split(","))
        self.peer_info = {k: v for k, v in meta.items() if k != "token"}
        self._set_peer_limit(meta)
        reply = {
            "version": str(VERSION),
            "codec": self.codec.name,
            "features": FEATURES,
            "max_frame": str(self.config.limits.max_frame),
        }
        self._write(encode_frame(_HELLO, 0, metadata=reply, flags=FLAG_REPLY), ordered=True)
        self._handshake_done()

    def _set_peer_limit(self, meta: dict[str, str]) -> None:
        """Take the peer's receive limit from its HELLO (the default when it names none)."""
        announced = meta.get("max_frame")
        if announced is None:
            return
        valid = announced.isascii() and announced.isdigit() and len(announced) <= 20
        if not valid:
            raise ProtocolError(f"HELLO announces an invalid max_frame {announced[:32]!r}")
        if int(announced) < MIN_PEER_MAX_FRAME:
            raise ProtocolError(
                f"HELLO announces max_frame {announced}, below the protocol's minimum of "
                f"{MIN_PEER_MAX_FRAME} bytes (no error reply would fit)"
            )
        self._peer_max_frame = int(announced)
        self._send_check = max(0, self._peer_max_frame - HEADER_SIZE - SIZE_SLACK)

    def _handshake_done(self) -> None:
        self._handshaken = True
        # frames past the handshake limit are fine now; those that arrived behind the HELLO
        # wait in the decoder (it ends a batch at a HELLO while in handshake mode)
        self._decoder.set_max_frame(self.config.limits.max_frame)
        if self._decoder.pending_bytes:
            self.loop.call_soon(self._decoder.received, 0)
        self._route_all()
        self._handshake.set_result(None)
        self.byte_stream.handshake_done()  # last: it may fail the stream (rdma's locked memory)

    def _route_all(self) -> None:
        """After the handshake, while reading: the decoder resolves replies itself while
        nobody waits for a slot, and a request that arrives alone is served at once (its
        reply leaves unbatched)."""
        self._decoder.route(
            self._dispatch,
            self._protocol_failure,
            self._pending,
            self._slot_waiters,
            self._request_handler,
        )

    def refuse(self, reason: str, message: str) -> None:
        """Server side: answer the coming HELLO with this error instead of accepting."""
        self._refusal = (reason, message)

    def _check_hello(self, meta: dict[str, str]) -> tuple[str, str] | None:
        """None if the client's HELLO is acceptable, else (reason, message)."""
        if self._refusal is not None:
            return self._refusal
        if meta.get("version") != str(VERSION):
            return "version", f"unsupported polyrpc version {meta.get('version')!r}; need {VERSION}"
        try:
            codec_by_name(meta.get("codec", ""))
        except ValueError as exc:
            return "codec", str(exc)
        expected, given = self.config.token, meta.get("token")
        # compared in constant time (as bytes: compare_digest refuses non-ASCII str)
        if expected is not None and (
            given is None or not hmac.compare_digest(given.encode(), expected.encode())
        ):
            what = "missing" if given is None else "wrong"
            return "bad_token", f"{what} token: this server requires a valid token"
        return None

    def _error_body(self, frame: Frame) -> tuple[str, str]:
        """(code, message) of an ERROR frame about the whole connection (seq 0)."""
        try:
            body = self._decode(frame)
        except Exception as exc:  # any codec's failure: the frame came from the peer
            return "refused", f"undecodable error report ({exc})"
        if not isinstance(body, dict):
            return "refused", str(body)
        return str(body.get("code", "refused")), str(body.get("message", ""))

    def _on_handshake_error(self, frame: Frame) -> None:
        reason, message = self._error_body(frame)
        exc = HandshakeError(f"the server refused the connection: {message}", reason)
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()
        self.abort(exc)

    def _on_fatal_error(self, frame: Frame) -> None:
        """The peer reports why it is ending the connection (e.g. a frame over its limit):
        every pending operation fails with that reason instead of a bare reset."""
        code, message = self._error_body(frame)
        log.warning(
            "%s peer %s ended the connection: %s (%s)", self.transport, self.peer, message, code
        )
        self.abort(
            ConnectionLost(f"the {self.transport} peer ended the connection: {message} ({code})")
        )

    # ---------------------------------------------------------- receive side
    def _dispatch(self, frames: list[Frame]) -> None:
        """Handle frames in order; replies written meanwhile go out in one write afterwards."""
        self._in_receive = True
        try:
            for index, frame in enumerate(frames):
                if self._paused:  # handling an earlier frame paused reading: the rest waits
                    self._held += frames[index:]
                    break
                kind = frame.kind
                if kind in (_RESPONSE, _ERROR):
                    if frame.seq == 0 and kind == _ERROR:  # about the connection, not a call
                        if self._handshaken:
                            self._on_fatal_error(frame)
                        else:
                            self._on_handshake_error(frame)
                        return
                    if not self._handshaken:  # no call can be pending yet: a broken peer
                        raise ProtocolError(f"{Kind(kind).name} before HELLO")
                    future = self._pending.pop(frame.seq, None)
                    if future is not None:
                        if not future.done():
                            future.set_result(frame)
                        if self._slot_waiters:
                            self._wake_slot()
                elif not self._handshaken:
                    if kind != _HELLO:
                        raise ProtocolError(f"{Kind(kind).name} before HELLO")
                    self._on_hello(frame)
                elif kind == _REQUEST:
                    self._request_handler(frame)
                elif kind == _ONEWAY:
                    self.on_oneway(frame)
                elif kind == _HEARTBEAT:
                    if not frame.flags & FLAG_REPLY:
                        self._write(encode_frame(_HEARTBEAT, frame.seq, flags=FLAG_REPLY))
                elif kind == _GOAWAY:
                    self._peer_closing = True
                    self._accepting = False
                    self.on_goaway()
                elif kind == _HELLO:
                    raise ProtocolError("HELLO received twice")
                else:
                    self.on_frame(frame)
        except ProtocolError as exc:
            self._protocol_failure(exc)
        finally:
            self._in_receive = False
            if self._out:
                self._flush()

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the peer for ``reason`` (a PAUSE_* bit) until it is resumed.

        Frames already read but not handled yet wait too (everything goes through
        :meth:`_dispatch`, which holds them), so nothing more is served from this peer.
        """
        if not self._paused and not self._gone:
            self.byte_stream.pause_reading()
            if self._handshaken:
                self._decoder.route(self._dispatch, self._protocol_failure)
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

    def _protocol_failure(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: tell it why (an ERROR naming the problem and our
        limit), then drop this connection only. Later input is ignored (the decoder stays
        broken) while the ERROR flushes."""
        if self._gone or self.close_reason is not None:
            return  # already failing or aborted
        log.warning("%s connection from %s: protocol error: %s", self.transport, self.peer, exc)
        self.close_reason = exc
        self._accepting = False
        if not self._handshake.done():
            self._handshake.set_exception(
                HandshakeError(f"handshake with {self.peer} failed: {exc}", "not_polyrpc")
            )
            self._handshake.exception()
        body = {
            "type": "ProtocolError",
            "message": str(exc),
            "code": "protocol_error",
            "max_frame": self.config.limits.max_frame,
        }
        self._out += encode_frame(_ERROR, 0, self.codec.encode(body), codec=self.codec.id)
        self._out_ordered = True
        self._flush()
        self.byte_stream.pause_reading()  # nothing more is read while the ERROR flushes
        self.loop.create_task(self._close_after_failure())

    async def _close_after_failure(self) -> None:
        """Close once the ERROR is flushed (abort if that takes longer than FAILURE_LINGER)."""
        try:
            await asyncio.wait_for(self.byte_stream.close(), FAILURE_LINGER)
        except (TimeoutError, ConnectionLost):
            self.byte_stream.abort()

    def data_received(self, data: Buffer) -> None:
        """Bytes from a stream that hands them over: the decoder delivers the frames."""
        self._decoder.received_data(data)

    def eof_received(self) -> None:
        if self._decoder.pending_bytes:
            self._protocol_failure(
                ProtocolError(
                    f"connection closed in the middle of a frame "
                    f"({self._decoder.pending_bytes} bytes of it received)"
                )
            )
            return
        # a peer closing gracefully says GOAWAY first (or answers ours): an EOF without that
        # goodbye means it went away (killed, crashed), so its handlers stop now rather
        # than run for the graceful close_timeout with nobody to answer
        goodbye = self._peer_closing or self._closing
        self._peer_closing = True
        self._accepting = False
        self._fail_pending(ConnectionLost(f"the peer closed the {self.transport} connection"))
        if not goodbye:
            self.on_abandoned()
        self.on_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if self.close_reason is None:
            self.close_reason = exc
        reason = self.close_reason
        if isinstance(reason, ConnectionLost):
            lost = fresh_error(reason)
        elif reason is not None:
            lost = ConnectionLost(f"{self.transport} connection dropped: {reason}")
        else:
            lost = ConnectionLost(f"{self.transport} connection closed")
        for timer in (
            self._deadline_timer,
            self._heartbeat_timer,
            self._flush_handle,
            self._resume_handle,
        ):
            if timer is not None:
                timer.cancel()
        self._out.clear()
        self._held.clear()
        if not self._handshake.done():
            self._handshake.set_exception(lost)
            self._handshake.exception()
        self._fail_pending(lost)
        if not self._closed.done():
            self._closed.set_result(exc)
        self._accepting = False
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
        self._deadline_timer = self._heartbeat_timer = self._flush_handle = None
        self._resume_handle = None

    def _fail_pending(self, exc: ConnectionLost) -> None:
        pending = list(self._pending.values())
        self._pending.clear()  # in place: the decoder and the C call server hold this dict
        for future in pending:
            if not future.done():
                future.set_exception(exc)
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
    def encode(self, obj: Any) -> tuple[Buffer, int]:
        """(payload, codec id): bytes-like objects go raw, the rest with the session codec."""
        if isinstance(obj, BYTES_LIKE):
            return obj, 0
        return self.codec.encode(obj), self.codec.id

    def _decode(self, frame: Frame) -> Any:
        codec = self.codec if frame.codec == self.codec.id else codec_by_id(frame.codec)
        return codec.decode(frame.payload)

    def decode(self, frame: Frame) -> Any:
        """The payload of ``frame`` as an object (bytes for raw frames)."""
        if frame.codec == 0:
            return RAW.decode(frame.payload)
        return self._decode(frame)

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

    def lost_error(self) -> ConnectionLost:
        """The error to raise for operations on a closed connection (a new one each time:
        see :func:`~polyrpc.stream.trait.fresh_error`)."""
        reason = self.close_reason
        if isinstance(reason, ConnectionLost):
            return fresh_error(reason)
        return ConnectionLost(f"the {self.transport} connection is closed")

    def _check_open(self) -> None:
        if not self._accepting:
            self._raise_not_accepting()

    def _raise_not_accepting(self) -> None:
        if self._closed.done():
            raise self.lost_error()
        if self._closing:
            raise ConnectionLost(f"the {self.transport} connection is closing")
        raise ConnectionLost("the peer is closing the connection; no new requests")

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

    def begin_request(
        self,
        obj: Any,
        method: str = "",
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
        flags: int = 0,
        codec: int | None = None,
    ) -> tuple[int, asyncio.Future[Frame]]:
        """Write a REQUEST now (the caller awaited :meth:`wait_before_request`); returns
        (seq, reply future).

        ``codec``: ``obj`` is already a payload encoded with the codec of this id.
        """
        self._check_open()
        if codec is not None:
            payload = obj
        elif isinstance(obj, BYTES_LIKE):
            payload, codec = obj, 0
        else:
            payload, codec = self.codec.encode(obj), self.codec.id
        if timeout is not None:
            if timeout <= 0:
                raise CallTimeout(f"{method or 'request'}: timeout must be positive")
            metadata = {**(metadata or {}), "timeout": f"{timeout:.6g}"}
        if len(payload) > self._send_check:
            self.check_size(len(payload), method, metadata, f"the request {method}".rstrip())
        seq = self._next_seq
        self._next_seq = seq + 2
        if timeout is not None:
            self._track_deadline(seq, method, timeout)
        future: asyncio.Future[Frame] = self.loop.create_future()
        self._pending[seq] = future
        if method or metadata:
            frame = encode_frame(
                _REQUEST, seq, payload, method=method, metadata=metadata, codec=codec, flags=flags
            )
        else:
            frame = encode_plain(_REQUEST, seq, payload, codec, flags)
        self._write(frame, ordered=False)
        return seq, future

    def check_size(
        self,
        payload_size: int,
        method: str = "",
        metadata: dict[str, str] | None = None,
        what: str = "the message",
    ) -> None:
        """Raise MessageTooLarge if this frame would exceed the peer's ``max_frame``.

        The send paths call it only for payloads over ``_send_check`` (one integer compare
        on the hot path); it computes the frame's exact size."""
        size = HEADER_SIZE + payload_size
        if method:
            size += len(method.encode())
        if metadata:
            size += len(encode_metadata(metadata))
        if size > self._peer_max_frame:
            raise MessageTooLarge(size, self._peer_max_frame, what)

    def cancel_request(self, seq: int) -> None:
        """Forget request ``seq`` (its caller gave up) and tell the peer to stop working on it."""
        if self.finish_request(seq) is not None and not self._closed.done():
            self._write(encode_frame(_CANCEL, seq))

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

    def result(self, frame: Frame) -> Any:
        """Decode a reply frame: the value of a RESPONSE, or raise the ERROR's RemoteError."""
        if frame.kind == _ERROR:
            raise self.remote_error(frame)
        return self.decode(frame)

    def remote_error(self, frame: Frame) -> RemoteError:
        """The RemoteError described by an ERROR frame."""
        body = self._decode(frame)
        if not isinstance(body, dict):
            return RemoteError("Error", str(body), "unknown")
        return RemoteError(
            str(body.get("type", "Error")),
            str(body.get("message", "")),
            str(body.get("code", "handler_error")),
            body.get("traceback"),
        )

    def _track_deadline(self, seq: int, method: str, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        self._pending_info[seq] = (method, timeout)
        if self._deadlines.add(seq, deadline):
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            when = self._deadlines.next_deadline()
            assert when is not None
            self._deadline_timer = self.loop.call_at(when, self._expire_deadlines)

    def _expire_deadlines(self) -> None:
        """Fail every request whose deadline passed, in one sweep, and tell the peer."""
        self._deadline_timer = None
        for seq in self._deadlines.expire(self.loop.time()):
            method, timeout = self._pending_info.pop(seq, ("", 0.0))
            future = self._pending.pop(seq, None)
            if future is None or future.done():
                continue
            if self._slot_waiters:
                self._wake_slot()
            future.set_exception(CallTimeout(f"{method or 'request'} timed out after {timeout:g}s"))
            if not self._closed.done():
                self._write(encode_frame(_CANCEL, seq))
        when = self._deadlines.next_deadline()
        if when is not None and not self._closed.done():
            self._deadline_timer = self.loop.call_at(when, self._expire_deadlines)

    def _can_reply(self) -> bool:
        """False once the stream is closing or gone: a reply then has nobody to reach (the
        handler that made it must not fail for that, nor its task end with an error)."""
        return not (self._gone or self._closed.done() or self.byte_stream.is_closing)

    def respond(self, seq: int, obj: Any, *, flags: int = 0) -> None:
        """Answer request ``seq`` with ``obj``: an ERROR frame instead if it cannot be
        encoded (``unencodable_result``) or is over the peer's limit (``result_too_large``)."""
        if not self._can_reply():
            return
        if isinstance(obj, BYTES_LIKE):
            payload, codec = obj, 0
        else:
            try:
                payload, codec = self.codec.encode(obj), self.codec.id
            except TypeError as exc:
                log.warning("cannot encode the reply to request %d: %s", seq, exc)
                self.respond_error(seq, exc, "unencodable_result")
                return
        if len(payload) > self._send_check:
            try:
                self.check_size(len(payload), what="the result")
            except MessageTooLarge as exc:
                log.warning("the reply to request %d is too large for %s: %s", seq, self.peer, exc)
                error = result_too_large(exc)
                self.respond_error(seq, error, error.code)
                return
        self._write(encode_plain(_RESPONSE, seq, payload, codec, flags), ordered=False)

    def respond_error(
        self, seq: int, exc: BaseException, code: str, traceback_text: str | None = None
    ) -> None:
        """Answer request ``seq`` with an ERROR frame describing ``exc``."""
        if not self._can_reply():
            return
        body = self.codec.encode(error_payload(exc, code, traceback_text))
        if len(body) > self._send_check:
            try:
                self.check_size(len(body), what="the error reply")
            except MessageTooLarge as too_large:  # a huge message or traceback: say so
                body = self.codec.encode(error_payload(result_too_large(too_large), code))
        self._write(encode_frame(_ERROR, seq, body, codec=self.codec.id), ordered=False)

    def send_oneway(
        self,
        obj: Any,
        *,
        method: str = "",
        metadata: dict[str, str] | None = None,
        codec: int | None = None,
    ) -> None:
        """Queue a one-way message (no reply); ``codec``: ``obj`` is a payload encoded with
        the codec of this id. Callers await :meth:`wait_writable` after."""
        self._check_open()
        payload, codec = (obj, codec) if codec is not None else self.encode(obj)
        if len(payload) > self._send_check:
            self.check_size(len(payload), method, metadata, f"the message {method}".rstrip())
        self._write(
            encode_frame(_ONEWAY, 0, payload, method=method, metadata=metadata, codec=codec)
        )

    def send_frame(
        self,
        kind: int,
        seq: int,
        obj: Any = b"",
        *,
        flags: int = 0,
        metadata: dict[str, str] | None = None,
        ordered: bool = True,
    ) -> None:
        """Send a frame of any kind (used by layers above for streams, credit, cancel)."""
        if self._closed.done():
            raise self.lost_error()
        payload, codec = self.encode(obj)
        if len(payload) > self._send_check:
            self.check_size(len(payload), "", metadata, "the stream item")
        self._write(
            encode_frame(kind, seq, payload, metadata=metadata, codec=codec, flags=flags),
            ordered=ordered,
        )

    def is_own_seq(self, seq: int) -> bool:
        """True if ``seq`` numbers an exchange this side started."""
        return seq % 2 == (1 if self.is_client else 0)

    # ---------------------------------------------------- liveness, closing
    def _arm_heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        idle = self.config.idle_timeout
        periods = [p for p in (interval, idle / 4 if idle else 0) if p > 0]
        if periods and not self._closed.done():
            self._heartbeat_timer = self.loop.call_later(min(periods), self._on_heartbeat_timer)

    def _on_heartbeat_timer(self) -> None:
        # activity is sampled here from the byte counters, keeping clocks off the hot path
        now = self.loop.time()
        self._decoder.trim()  # an idle connection gives back a receive buffer grown by bursts
        if self.bytes_in != self._seen_in or self._paused:
            # (while this side does not read, the peer's silence proves nothing)
            self._seen_in, self._last_recv = self.bytes_in, now
        if self.bytes_out != self._seen_out:
            self._seen_out, self._last_send = self.bytes_out, now
        idle = self.config.idle_timeout
        if idle and now - self._last_recv > idle:
            self.abort(
                ConnectionLost(
                    f"no data from the {self.transport} peer {self.peer} for {idle:g}s; "
                    "assuming it is dead"
                )
            )
            return
        interval = self.config.heartbeat_interval
        # (a stream that is closing takes no more writes: the idle check above still runs)
        if interval and now - self._last_send >= interval * 0.9 and not self.byte_stream.is_closing:
            self._write(encode_frame(_HEARTBEAT, 0))
        self._arm_heartbeat()

    async def close(self) -> None:
        """Graceful close: no new requests, let in-flight work finish, flush, then close."""
        if self._closed.done():
            return
        if not self._closing:
            self._closing = True
            self._accepting = False
            try:
                if self._handshake.done() and not self._peer_closing:
                    self._write(encode_frame(_GOAWAY, 0))
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
