"""The session's protocol as a sans-IO state machine: bytes and time in; bytes, events and
the next timer deadline out.

``SessionCore`` owns the frame decoder, the HELLO handshake, sequence ids, the window of
in-flight requests, deadlines, heartbeats and the idle timeout, GOAWAY and the end of a
connection. It runs no event loop, touches no stream and reads no clock of its own: received
bytes go into its decoder (:meth:`receive_data`, or the decoder's buffer), the time comes from
the ``clock`` it was given and from :meth:`handle_timer`, what it wants to send collects in
:meth:`data_to_send` and it says when it next needs the time (:meth:`timer`).

What happens is reported by hooks (``on_request``, ``_reply_received``...). The bare core
records them as :class:`Event` objects (:meth:`next_event`), which is how tests drive it
without sockets or sleeps (tests/test_session_core.py); the asyncio adapter
(polyrpc/session/session.py) overrides them to resolve futures, start handlers and use the
stream, so the hot path makes no event objects.
"""

from __future__ import annotations

import hmac
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    CallTimeout,
    ConnectionLost,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
)
from ..stream.trait import Buffer, fresh_error
from ..wire.codecs import RAW, Codec, codec_by_id, codec_by_name
from ..wire.compression import DecompressionRefused, Zstd, available, compression_by_name
from ..wire.frames import (
    FLAG_COMPRESSED,
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
_STREAM_ITEM = int(Kind.STREAM_ITEM)
BYTES_LIKE = (bytes, bytearray, memoryview)
"""Payload types sent raw (codec 0): no encoding, no copy."""
DEFAULT_PEER_MAX_FRAME = Limits().max_frame
"""The receive limit assumed for a peer whose HELLO announces none (older versions)."""
SIZE_SLACK = 128 << 10
"""Room left for a frame's method name and metadata (a peer accepts 65 KiB of them by
default): payloads up to the peer's max_frame less this are sent without an exact size check."""


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
    compression: str | None = None
    """Client: the compression to offer in HELLO (``"zstd"``); used if the server accepts."""
    accept_compression: tuple[str, ...] = ("zstd",)
    """Server: the compressions it accepts when a client offers one (where the library is
    installed); ``()`` refuses compression."""
    compression_threshold: int = 1024
    """With compression on, payloads smaller than this many bytes are sent as they are."""

    def __post_init__(self) -> None:
        codec_by_name(self.codec)
        if self.compression is not None:
            compression_by_name(self.compression)  # a clear error now if it cannot work
        if self.compression_threshold < 0:
            raise ValueError("compression_threshold must be at least 0")
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


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class Event:
    """Something the bare core reports (the asyncio adapter acts on it directly instead)."""


@dataclass(frozen=True)
class HandshakeCompleted(Event):
    """HELLO was exchanged: requests may flow."""


@dataclass(frozen=True)
class HandshakeFailed(Event):
    error: Exception


@dataclass(frozen=True)
class ReplyReceived(Event):
    """A RESPONSE or ERROR answering a request of this side (``frame.seq``)."""

    frame: Frame


@dataclass(frozen=True)
class RequestFailed(Event):
    """Request ``seq`` of this side ended without a reply (its deadline passed, the
    connection ended)."""

    seq: int
    error: Exception


@dataclass(frozen=True)
class RequestReceived(Event):
    frame: Frame


@dataclass(frozen=True)
class OnewayReceived(Event):
    frame: Frame


@dataclass(frozen=True)
class FrameReceived(Event):
    """Any other frame kind (CANCEL, STREAM_ITEM, STREAM_END, CREDIT)."""

    frame: Frame


@dataclass(frozen=True)
class PeerClosing(Event):
    """The peer said GOAWAY: it accepts no new requests."""


@dataclass(frozen=True)
class PeerFinished(Event):
    """The peer finished sending (end of stream); ``abandoned``: without a goodbye first."""

    abandoned: bool


@dataclass(frozen=True)
class ConnectionEnded(Event):
    """The connection ends: closed once what is queued is sent (after a refusal or a
    protocol failure, which ``error`` names) or dropped now (``abort``)."""

    error: Exception | None


def _no_waiter() -> bool:
    """What the bare core registers for a request: a mark (its reply is an event)."""
    return True


class SessionCore(SessionState):
    """One polyrpc connection's protocol, with no I/O: see the module's docstring.

    ``clock`` gives the time for deadlines and liveness (the adapter's loop time; a test's
    fake one). Its :class:`SessionState` base holds the state the C call server uses.
    """

    # slots: a session has more attributes than CPython's shared-key dicts hold (30),
    # so with a __dict__ every attribute access on the hot path would be a dict lookup
    __slots__ = (
        "_accepting",
        "_clock",
        "_closing",
        "_compression",
        "_deadlines",
        "_decoder",
        "_events",
        "_handshake_over",
        "_handshaken",
        "_held",
        "_last_recv",
        "_last_send",
        "_max_in_flight",
        "_new_waiter",
        "_next_liveness",
        "_next_seq",
        "_out",
        "_out_ordered",
        "_paused",
        "_peer_closing",
        "_peer_max_frame",
        "_pending",
        "_pending_info",
        "_refusal",
        "_replay_after_hello",
        "_request_handler",
        "_seen_in",
        "_seen_out",
        "close_reason",
        "codec",
        "config",
        "is_client",
        "peer_features",
        "peer_info",
    )

    def __init__(
        self, config: SessionConfig, *, is_client: bool, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.is_client = is_client
        self._clock = clock
        self.codec: Codec = codec_by_name(config.codec)
        self.peer_features: set[str] = set()
        self.peer_info: dict[str, str] = {}
        self._events: deque[Event] = deque()
        self._decoder = RoutingDecoder(config.limits, handshake=True)
        # the decoder hands the frames to _dispatch itself, after the handshake (in the
        # adapter) also resolving plain replies and serving lone requests
        self._decoder.route(self._dispatch, self._protocol_failure)
        self._next_seq = 1 if is_client else 2
        """Clients number their requests odd, servers even: a seq names one exchange."""
        self._pending: dict[int, Any] = {}
        """Requests awaiting a reply: seq -> what ``_new_waiter()`` made for it."""
        self._new_waiter: Callable[[], Any] = _no_waiter
        self._request_handler: Callable[[Frame], object] = self.on_request
        """Serves each REQUEST frame: on_request, or an accelerated equivalent."""
        self._pending_info: dict[int, tuple[str, float]] = {}
        self._max_in_flight = config.max_in_flight
        self._out: list[Buffer] = []
        self._out_ordered = False
        self._flush_handle = None
        self._in_receive = False
        self._deadlines = DeadlineWheel()
        self._next_liveness: float | None = None
        """When liveness is next checked (heartbeat, idle timeout); None before the handshake."""
        self._last_recv = self._last_send = clock()
        self._seen_in = self._seen_out = 0
        self._accepting = True
        """False once closing, closed or the peer is closing: no new requests."""
        self._handshake_over = False
        """True once the handshake succeeded or failed."""
        self._handshaken = False
        """True once HELLO was exchanged (a flag: checked for every received frame)."""
        self._replay_after_hello = False
        """Frames arrived behind the HELLO and wait in the decoder (see _handshake_done)."""
        self._gone = False
        """True once the connection ended (a flag: checked on every write)."""
        self._closing = False
        self._peer_closing = False
        self.close_reason: Exception | None = None
        self._refusal: tuple[str, str] | None = None
        self._peer_max_frame = DEFAULT_PEER_MAX_FRAME
        """The largest frame the peer accepts (``max_frame`` in its HELLO)."""
        self._send_check = DEFAULT_PEER_MAX_FRAME - HEADER_SIZE - SIZE_SLACK
        """Payloads up to this size fit the peer's limit whatever the method and metadata
        (and are below the compression threshold): the send paths compare only this
        integer, and check (and compress) bigger ones in :meth:`_prepare_large`."""
        self._compression: Zstd | None = None
        """The compression negotiated in HELLO, None when the peer did not accept one."""
        self.bytes_out = 0
        self._paused = 0
        """Why frames are not handled now (the adapter's PAUSE_* bits), 0 while they are."""
        self._held: list[Frame] = []
        """Frames received while paused: handled first when reading resumes."""

    # ------------------------------------------------------ sans-IO surface
    def receive_data(self, data: Buffer) -> None:
        """Bytes from the peer: the decoder delivers whole frames to the session."""
        self._decoder.received_data(data)
        while self._replay_after_hello and not self._gone:
            self._replay_after_hello = False
            self._decoder.received(0)

    def data_to_send(self) -> list[Buffer]:
        """The frames queued for the peer since the last call (whole frames, in order)."""
        out, self._out = self._out, []
        self._out_ordered = False
        return out

    def next_event(self) -> Event | None:
        """The oldest event the bare core recorded, or None."""
        return self._events.popleft() if self._events else None

    def timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (clock time), or None."""
        deadline = self._deadlines.next_deadline()
        liveness = self._next_liveness
        if deadline is None or (liveness is not None and liveness < deadline):
            return liveness
        return deadline

    def handle_timer(self, now: float) -> None:
        """The time is ``now``: expire deadlines, send a heartbeat or declare the peer dead."""
        if self._gone:
            return
        self._expire_deadlines(now)
        if self._next_liveness is not None and now >= self._next_liveness:
            self._check_liveness(now)

    # ------------------------------------------------------------------ info
    @property
    def bytes_in(self) -> int:
        """Bytes received on this connection."""
        return self._decoder.bytes_received

    @property
    def in_flight(self) -> int:
        """Outgoing requests awaiting a reply."""
        return len(self._pending)

    @property
    def transport(self) -> str:
        """The transport's name (the adapter's stream names it)."""
        return "sans-io"

    @property
    def peer(self) -> Any:
        """The peer's address (the adapter's stream knows it)."""
        return None

    # ------------------------------------------------------------- handshake
    def send_hello(self) -> None:
        """Client side: propose the session (version, codec, features, limit, token)."""
        meta = {
            "version": str(VERSION),
            "codec": self.codec.name,
            "features": FEATURES,
            "max_frame": str(self.config.limits.max_frame),
        }
        if self.config.token is not None:
            meta["token"] = self.config.token
        if self.config.compression is not None:
            meta["compression"] = self.config.compression
        self._write(encode_frame(_HELLO, 0, metadata=meta), ordered=True)

    def refuse(self, reason: str, message: str) -> None:
        """Server side: answer the coming HELLO with this error instead of accepting."""
        self._refusal = (reason, message)

    def _on_hello(self, frame: Frame) -> None:
        meta = frame.metadata
        if self._handshake_over:
            raise ProtocolError("HELLO received twice")
        if self.is_client:
            if not frame.flags & FLAG_REPLY:
                raise ProtocolError("expected a HELLO reply from the server")
            self.peer_features = set(meta.get("features", "").split(","))
            self.peer_info = dict(meta)
            self._set_peer_limit(meta)
            accepted = meta.get("compression")
            if accepted is not None:
                if accepted != self.config.compression:
                    raise ProtocolError(f"HELLO accepts compression {accepted[:32]!r}, not offered")
                self._use_compression(compression_by_name(accepted))
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
            self._handshake_over = True
            self._accepting = False
            self._handshake_failed(HandshakeError(message, reason))
            self._close_soon()
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
        accepted = self._accepted_compression(meta.get("compression", ""))
        if accepted is not None:
            reply["compression"] = accepted
            self._use_compression(compression_by_name(accepted))
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

    def _accepted_compression(self, offered: str) -> str | None:
        """Server side: the first compression the client offers (comma-separated) that this
        side accepts and can run, None for none."""
        for name in offered.split(","):
            if name in self.config.accept_compression and available(name):
                return name
        return None

    def _use_compression(self, compression: Zstd) -> None:
        """Compression was negotiated: payloads from the threshold up take the checked send
        path (which compresses them), and received frames are inflated before dispatch."""
        self._compression = compression
        self._send_check = min(self._send_check, self.config.compression_threshold - 1)

    def _handshake_done(self) -> None:
        self._handshaken = self._handshake_over = True
        # frames past the handshake limit are fine now; those that arrived behind the HELLO
        # wait in the decoder (it ends a batch at a HELLO while in handshake mode)
        self._decoder.set_max_frame(self.config.limits.max_frame)
        if self._decoder.pending_bytes:
            self._replay_after_hello = True
        self._route_all()
        period = self._liveness_period()
        if period is not None:
            self._next_liveness = self._clock() + period
        self._handshake_completed()

    def _route_all(self) -> None:
        """After the handshake, while reading: where the decoder delivers (the adapter also
        lets it resolve replies and serve lone requests itself)."""
        self._decoder.route(self._frames_receiver(), self._protocol_failure)

    def _frames_receiver(self) -> Callable[[list[Frame]], None]:
        """Where received frames go after the handshake: :meth:`_dispatch`, through
        :meth:`_dispatch_inflating` where compression was negotiated."""
        return self._dispatch if self._compression is None else self._dispatch_inflating

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
        if not self._handshake_over:
            self._handshake_over = True
            self._handshake_failed(exc)
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
                    waiter = self._pending.pop(frame.seq, None)
                    if waiter is not None:
                        self._reply_received(waiter, frame)
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

    def _dispatch_inflating(self, frames: list[Frame]) -> None:
        """:meth:`_dispatch` for a connection that negotiated compression: compressed
        payloads are decompressed first (the frames then look as if sent plain); one
        refused is answered by :meth:`_refuse_compressed` and not dispatched."""
        compression = self._compression
        assert compression is not None
        kept: list[Frame] = []
        for frame in frames:
            if frame.flags & FLAG_COMPRESSED:
                try:
                    frame.payload = compression.decompress(
                        frame.payload, self.config.limits.max_frame - HEADER_SIZE
                    )
                except DecompressionRefused as exc:
                    self._refuse_compressed(frame, exc)
                    continue
                frame.flags &= ~FLAG_COMPRESSED
            kept.append(frame)
        if kept:
            self._dispatch(kept)
        elif self._out:
            self._flush()

    def _refuse_compressed(self, frame: Frame, exc: DecompressionRefused) -> None:
        """A compressed payload was refused (a bomb, a lie, garbage): only its message is
        lost, as with a payload that does not decode. A request is answered with an ERROR
        (``exc.code``), a reply fails its call with ``exc``, a one-way message is dropped
        with a warning, a stream item ends its stream (a result stream fails and is
        cancelled; an argument stream's call is answered with the ERROR and cancelled)."""
        kind, seq = frame.kind, frame.seq
        log.warning(
            "%s peer %s: %s %d refused: %s", self.transport, self.peer, Kind(kind).name, seq, exc
        )
        if kind == _REQUEST:
            self.respond_error(seq, exc, exc.code)
        elif kind in (_RESPONSE, _ERROR) or (kind == _STREAM_ITEM and self.is_own_seq(seq)):
            waiter = self.finish_request(seq)
            if waiter is not None:
                self._request_failed(seq, waiter, exc)
                if kind == _STREAM_ITEM and not self._gone:
                    self._write(encode_frame(_CANCEL, seq))  # the producer stops
        elif kind == _STREAM_ITEM:  # an argument streamed to a call served here
            self.respond_error(seq, exc, exc.code)
            self._dispatch([type(frame)(_CANCEL, seq)])  # its handler stops: nobody waits
        elif kind != _ONEWAY:  # control frames are never big: a peer sending bad ones is broken
            self._protocol_failure(exc)

    def _protocol_failure(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: tell it why (an ERROR naming the problem and our
        limit), then drop this connection only. Later input is ignored (the decoder stays
        broken) while the ERROR flushes."""
        if self._gone or self.close_reason is not None:
            return  # already failing or aborted
        log.warning("%s connection from %s: protocol error: %s", self.transport, self.peer, exc)
        self.close_reason = exc
        self._accepting = False
        if not self._handshake_over:
            self._handshake_over = True
            self._handshake_failed(
                HandshakeError(f"handshake with {self.peer} failed: {exc}", "not_polyrpc")
            )
        body = {
            "type": "ProtocolError",
            "message": str(exc),
            "code": "protocol_error",
            "max_frame": self.config.limits.max_frame,
        }
        self._out += encode_frame(_ERROR, 0, self.codec.encode(body), codec=self.codec.id)
        self._out_ordered = True
        self._end_after_failure()

    def eof_received(self) -> None:
        """The peer finished sending."""
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

    def _connection_ended(self, reason: Exception | None) -> ConnectionLost:
        """The connection is gone (``reason`` None after a clean close): everything pending
        fails; returns the error it failed with."""
        self._gone = True
        self._accepting = False
        self._next_liveness = None
        if self.close_reason is None:
            self.close_reason = reason
        reason = self.close_reason
        if isinstance(reason, ConnectionLost):
            lost = fresh_error(reason)
        elif reason is not None:
            lost = ConnectionLost(f"{self.transport} connection dropped: {reason}")
        else:
            lost = ConnectionLost(f"{self.transport} connection closed")
        self._out.clear()
        self._held.clear()
        if not self._handshake_over:
            self._handshake_over = True
            self._handshake_failed(lost)
        self._fail_pending(lost)
        return lost

    def _fail_pending(self, exc: ConnectionLost) -> None:
        pending = list(self._pending.items())
        self._pending.clear()  # in place: the decoder and the C call server hold this dict
        for seq, waiter in pending:
            self._request_failed(seq, waiter, exc)

    # ----------------------------------------------------- hooks for layers
    def on_request(self, frame: Frame) -> None:
        """A REQUEST arrived; answer with :meth:`respond` / :meth:`respond_error`."""
        self._events.append(RequestReceived(frame))

    def on_oneway(self, frame: Frame) -> None:
        """A one-way message arrived."""
        self._events.append(OnewayReceived(frame))

    def on_frame(self, frame: Frame) -> None:
        """Any other frame kind (CANCEL, STREAM_ITEM, STREAM_END, CREDIT)."""
        self._events.append(FrameReceived(frame))

    def on_goaway(self) -> None:
        """The peer announced a graceful close: it accepts no new requests."""
        self._events.append(PeerClosing())

    def on_abandoned(self) -> None:
        """The peer went away without a goodbye: stop the work done for it."""
        self._events.append(PeerFinished(abandoned=True))

    def on_eof(self) -> None:
        """The peer finished sending (or was refused): close once this side's work is done."""
        self._events.append(PeerFinished(abandoned=False))

    # ------------------------------------------- hooks for the I/O adapter
    def _handshake_completed(self) -> None:
        self._events.append(HandshakeCompleted())

    def _handshake_failed(self, exc: Exception) -> None:
        self._events.append(HandshakeFailed(exc))

    def _reply_received(self, waiter: Any, frame: Frame) -> None:
        """``frame`` answers the request ``waiter`` was registered for (already forgotten)."""
        self._events.append(ReplyReceived(frame))

    def _request_failed(self, seq: int, waiter: Any, exc: Exception) -> None:
        """Request ``seq`` (``waiter`` was registered for it) ends with ``exc``; it is
        already forgotten."""
        self._events.append(RequestFailed(seq, exc))

    def _deadline_added(self) -> None:
        """A deadline earlier than every other was added: :meth:`timer` moved earlier."""

    def _write(self, buffers: Sequence[Buffer], ordered: bool = True) -> None:
        """Queue whole frames for the peer (the adapter sends them, batched)."""
        self._out += buffers
        if ordered:
            self._out_ordered = True

    def _flush(self) -> None:
        """Frames handled in one receive wrote their answers: they may go now."""

    def _can_send(self) -> bool:
        """False once nothing more can be sent (the adapter: also once its stream is
        closing): a reply then has nobody to reach (the handler that made it must not fail
        for that, nor its task end with an error)."""
        return not self._gone

    def _close_soon(self) -> None:
        """Nothing more is served (a refused HELLO): close once what is queued is sent."""
        self._events.append(ConnectionEnded(None))

    def _end_after_failure(self) -> None:
        """The ERROR naming a protocol failure is queued: end once it is sent."""
        self._events.append(ConnectionEnded(self.close_reason))

    def abort(self, exc: Exception | None = None) -> None:
        """Drop the connection now; pending operations fail with ConnectionLost."""
        if self._gone:
            return
        if exc is not None and self.close_reason is None:
            self.close_reason = exc
        self._events.append(ConnectionEnded(exc))
        self._connection_ended(exc)

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
        if self._gone:
            raise self.lost_error()
        if self._closing:
            raise ConnectionLost(f"the {self.transport} connection is closing")
        raise ConnectionLost("the peer is closing the connection; no new requests")

    def begin_request(
        self,
        obj: Any,
        method: str = "",
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
        flags: int = 0,
        codec: int | None = None,
    ) -> tuple[int, Any]:
        """Write a REQUEST now (the adapter's callers awaited its ``wait_before_request``);
        returns (seq, what ``_new_waiter()`` registered for its reply).

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
            payload, flags = self._prepare_large(
                payload, flags, method, metadata, f"the request {method}".rstrip()
            )
        seq = self._next_seq
        self._next_seq = seq + 2
        if timeout is not None:
            self._track_deadline(seq, method, timeout)
        waiter = self._pending[seq] = self._new_waiter()
        if method or metadata:
            frame = encode_frame(
                _REQUEST, seq, payload, method=method, metadata=metadata, codec=codec, flags=flags
            )
        else:
            frame = encode_plain(_REQUEST, seq, payload, codec, flags)
        self._write(frame, ordered=False)
        return seq, waiter

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

    def _prepare_large(
        self,
        payload: Buffer,
        flags: int,
        method: str = "",
        metadata: dict[str, str] | None = None,
        what: str = "the message",
    ) -> tuple[Buffer, int]:
        """(payload, flags) to send for a payload over ``_send_check``: MessageTooLarge if
        it is over the peer's limit (uncompressed: the peer's decompressed size limit),
        compressed with FLAG_COMPRESSED where compression was negotiated, the payload is at
        least the threshold and compressing makes it smaller."""
        self.check_size(len(payload), method, metadata, what)
        compression = self._compression
        if compression is not None and len(payload) >= self.config.compression_threshold:
            packed = compression.compress(payload)
            if packed is not None:
                return packed, flags | FLAG_COMPRESSED
        return payload, flags

    def cancel_request(self, seq: int) -> None:
        """Forget request ``seq`` (its caller gave up) and tell the peer to stop working on it."""
        if self.finish_request(seq) is not None and not self._gone:
            self._write(encode_frame(_CANCEL, seq))

    def finish_request(self, seq: int) -> Any:
        """Remove request ``seq`` from the window (for exchanges ended by other frames);
        returns what was registered for it, None if nothing was."""
        return self._pending.pop(seq, None)

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
        self._pending_info[seq] = (method, timeout)
        if self._deadlines.add(seq, self._clock() + timeout):
            self._deadline_added()

    def _expire_deadlines(self, now: float) -> None:
        """Fail every request whose deadline passed, in one sweep, and tell the peer."""
        for seq in self._deadlines.expire(now):
            method, timeout = self._pending_info.pop(seq, ("", 0.0))
            waiter = self._pending.pop(seq, None)
            if waiter is None:  # answered or abandoned before its deadline
                continue
            self._request_failed(
                seq, waiter, CallTimeout(f"{method or 'request'} timed out after {timeout:g}s")
            )
            if not self._gone:
                self._write(encode_frame(_CANCEL, seq))

    def respond(self, seq: int, obj: Any, *, flags: int = 0) -> None:
        """Answer request ``seq`` with ``obj``: an ERROR frame instead if it cannot be
        encoded (``unencodable_result``) or is over the peer's limit (``result_too_large``)."""
        if not self._can_send():
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
                payload, flags = self._prepare_large(payload, flags, what="the result")
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
        if not self._can_send():
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
        the codec of this id."""
        self._check_open()
        payload, codec = (obj, codec) if codec is not None else self.encode(obj)
        flags = 0
        if len(payload) > self._send_check:
            payload, flags = self._prepare_large(
                payload, flags, method, metadata, f"the message {method}".rstrip()
            )
        self._write(
            encode_frame(
                _ONEWAY, 0, payload, method=method, metadata=metadata, codec=codec, flags=flags
            )
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
        if self._gone:
            raise self.lost_error()
        payload, codec = self.encode(obj)
        if len(payload) > self._send_check:
            payload, flags = self._prepare_large(payload, flags, "", metadata, "the stream item")
        self._write(
            encode_frame(kind, seq, payload, metadata=metadata, codec=codec, flags=flags),
            ordered=ordered,
        )

    def is_own_seq(self, seq: int) -> bool:
        """True if ``seq`` numbers an exchange this side started."""
        return seq % 2 == (1 if self.is_client else 0)

    # ---------------------------------------------------- liveness, closing
    def _liveness_period(self) -> float | None:
        """How often liveness is checked: the heartbeat interval or a quarter of the idle
        timeout, whichever is shorter (None: neither is on)."""
        interval = self.config.heartbeat_interval
        idle = self.config.idle_timeout
        periods = [p for p in (interval, idle / 4 if idle else 0) if p > 0]
        return min(periods) if periods else None

    def _check_liveness(self, now: float) -> None:
        # activity is sampled here from the byte counters, keeping clocks off the hot path
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
        if interval and now - self._last_send >= interval * 0.9 and self._can_send():
            self._write(encode_frame(_HEARTBEAT, 0))
        period = self._liveness_period()
        self._next_liveness = None if period is None else now + period

    def start_close(self) -> None:
        """A graceful close begins: no new requests, and the peer is told (GOAWAY)."""
        if self._closing:
            return
        self._closing = True
        self._accepting = False
        if self._handshaken and not self._peer_closing and not self._gone:
            self._write(encode_frame(_GOAWAY, 0))
