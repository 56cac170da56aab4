"""QuicStream: the stream trait on one aioquic ``QuicConnection`` (sans-IO), driven by our UDP glue.

Every :meth:`QuicStream.write` call travels on its own unidirectional QUIC stream
and is delivered to the receiver only once that QUIC stream has ended, as one
unit. A lost packet therefore delays only the unit it belongs to; units from
different writes may overtake each other (``extra["unordered_units"]``). The
upper layer writes only whole frames per call, so any order of units is a valid
byte stream for it. EOF is an empty unit; it is delivered after every unit
opened before it (stream ids are sequential).

Backpressure both ways: a writer waits (``drain``) while more than the
high-water mark of its data is unacknowledged, and a receiver whose reader is
paused stops granting MAX_DATA credit, so the peer's writer waits in turn.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aioquic.buffer import Buffer as QuicBuffer
from aioquic.buffer import encode_uint_var
from aioquic.quic.connection import Limit, QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import Epoch as tls_epoch

from ...errors import ConnectionLost, HandshakeError
from ...stream.trait import Buffer, HalfClose, Stream, fresh_error

if TYPE_CHECKING:
    from aioquic.quic.stream import QuicStreamSender

CLOSE_TIMEOUT = 10.0
NO_ERROR = 0x0
ABORT_ERROR = 0x1
"""Application error code sent by :meth:`QuicStream.abort`."""
PROTOCOL_ERROR = 0x2
"""Application error code for a peer that breaks the stream rules below."""
CRYPTO_ERROR = 0x100
TRANSPORT_CONNECTION_REFUSED = 0x2
TRANSPORT_INVALID_TOKEN = 0xB
JOIN_LIMIT = 64 << 10
"""Writes smaller than this are joined into one buffer before aioquic copies them."""
FEED_AHEAD = 1 << 20
"""Bytes of a large unit handed to aioquic beyond what it has sent (plus what it may send
next: see QuicStream._top_up); the rest waits in the writer's own buffers, uncopied."""
FEED_WINDOW_CAP = 4 << 20
"""At most this much of the congestion window's free room is handed over too: aioquic paces
its packets, so on a fast path the window grows well past what it sends before the next
top-up (it reached 11 MiB on loopback) and would fill with unsent copies."""
UNIT, CHANNEL, EOF = 0, 1, 2
"""First byte of every unidirectional stream: one unit, the ordered channel, or EOF."""
UNIT_HEADER, CHANNEL_HEADER, EOF_HEADER = bytes([UNIT]), bytes([CHANNEL]), bytes([EOF])
ALERT_NO_APPLICATION_PROTOCOL = 120
CERTIFICATE_ALERTS = {42, 43, 44, 45, 46, 48}
IDLE_REASON = "Idle timeout"
REFUSALS_FOR_LOSS = 3
"""ICMP port-unreachable answers, with no packet from the peer in between, that end a
connection: one could be spoofed or stale, three to successive probes mean nobody listens."""
REFUSAL_PROBE_DELAY = 0.05
"""Seconds between the probes that confirm a refusal."""


class Driver(ABC):
    """What a QuicStream needs from its endpoint (client socket or listener)."""

    @abstractmethod
    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Put datagrams on the wire."""

    @abstractmethod
    def cid_issued(self, cid: bytes, stream: QuicStream) -> None:
        """Route datagrams for ``cid`` to ``stream``."""

    @abstractmethod
    def cid_retired(self, cid: bytes) -> None:
        """Stop routing ``cid``."""

    @abstractmethod
    def finished(self, stream: QuicStream) -> None:
        """The connection is over; release its routes (and the socket of a client)."""

    @abstractmethod
    def established(self, stream: QuicStream) -> None:
        """The handshake completed (a listener hands the stream to its handler)."""


def _nothing_held() -> int:
    """What a finished stream holds back from the peer's credit: nothing."""
    return 0


class ReceiveCredit(Limit):
    """MAX_DATA that grows only as the application takes delivery.

    aioquic doubles its receive window whenever half of it is used, whatever the
    application does with the data; this limit caps the window at ``window`` bytes
    beyond what the application has been handed (``held`` counts received units
    still waiting for a paused reader), so a slow reader stops the peer's writer.
    """

    def __init__(self, base: Limit, window: int, held: Callable[[], int]) -> None:
        self._window = window
        self._held = held
        self._value = base.value
        self.frame_type = base.frame_type
        self.name = base.name
        self.sent = base.sent
        self.used = base.used

    @property
    def value(self) -> int:
        """The current credit limit (bytes the peer may send in total)."""
        return self._value

    @value.setter
    def value(self, requested: int) -> None:
        cap = self.used - self._held() + self._window
        new = min(requested, cap)
        if new - self._value >= self._window >> 3:
            self._value = new


_FRAME_EPOCHS: dict[frozenset[tls_epoch], frozenset[tls_epoch]] = {}
"""One shared copy of each set of epochs a frame type is allowed in (see _share_frame_epochs)."""


def _share_frame_epochs(connection: QuicConnection) -> None:
    """Point a connection's frame-handler table at shared epoch sets (~7 KiB per connection).

    aioquic builds a table {frame type: (bound handler, frozenset of epochs)} in every
    QuicConnection, with a fresh frozenset per entry (~34 of them); they are immutable and
    only read (membership tests), so equal ones can be one object for all connections."""
    handlers = connection._QuicConnection__frame_handlers  # type: ignore[attr-defined]
    for frame_type, (handler, epochs) in handlers.items():
        handlers[frame_type] = (handler, _FRAME_EPOCHS.setdefault(epochs, epochs))


def _read_counts(data: bytes) -> tuple[int, int]:
    """The two varints of an EOF stream: units and ordered units sent before it."""
    buf = QuicBuffer(data=data[1:])
    return buf.pull_uint_var(), buf.pull_uint_var()


class OrderedChannel:
    """Splits the ordered stream (varint length + unit, repeated) back into whole units."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0
        self._chunks: list[Buffer] = []

    def feed(self, data: Buffer) -> list[list[Buffer]]:
        """Consume ``data``; return the units it completed (lists of memoryview chunks)."""
        done: list[list[Buffer]] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if not self._remaining:
                header = self._header
                header.append(view[pos])
                pos += 1
                if len(header) < 1 << (header[0] >> 6):
                    continue
                self._remaining = QuicBuffer(data=bytes(header)).pull_uint_var()
                header.clear()
                if not self._remaining:
                    raise ValueError("empty unit on the ordered stream")
                continue
            take = min(self._remaining, end - pos)
            self._chunks.append(view[pos : pos + take])
            pos += take
            self._remaining -= take
            if not self._remaining:
                done.append(self._chunks)
                self._chunks = []
        return done


_ping_ids = itertools.count(1)


class _Feed:
    """A large unit handed to aioquic a chunk at a time (see :meth:`QuicStream._top_up`)."""

    __slots__ = ("buffers", "remaining", "sender")

    def __init__(self, sender: QuicStreamSender, buffers: deque[memoryview], size: int) -> None:
        self.sender = sender
        self.buffers = buffers
        self.remaining = size


class QuicStream(Stream, HalfClose):
    """Stream trait over one QUIC connection (units on unidirectional QUIC streams)."""

    transport_name = "quic"

    def __init__(
        self,
        connection: QuicConnection,
        driver: Driver,
        peer: Any,
        *,
        window: int,
        keepalive: float,
        high_water: int,
        probe: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            {"peer": _format(peer), "unordered_units": True, "alpn": None, **(extra or {})},
            high_water=high_water,
            low_water=high_water // 4,
        )
        self.loop = asyncio.get_running_loop()
        self.connection = connection
        self.peer_address = peer
        """The socket address datagrams go to (as the socket reports it)."""
        self._driver = driver
        self._keepalive = keepalive
        self._probe = probe
        self._activity = 0
        self._active_until = 0.0
        self._refusals = 0
        self._refused_at_receive = 0.0
        self._incoming: dict[int, list[Buffer] | OrderedChannel] = {}
        self._express_id: int | None = None
        self._express: QuicStreamSender | None = None
        self._channel_id: int | None = None
        self._ready: deque[tuple[list[Buffer], bool]] = deque()
        self._ready_bytes = 0
        _share_frame_epochs(connection)
        connection._local_max_data = ReceiveCredit(
            connection._local_max_data, window, lambda: self._ready_bytes
        )
        self._delivered_unordered = 0
        self._delivered_ordered = 0
        self._sent_unordered = 0
        self._sent_ordered = 0
        self._eof_after: tuple[int, int] | None = None
        self._eof_delivered = False
        self._reading_paused = False
        self._eof_sent = False
        self._sending: dict[int, QuicStreamSender] = {}
        self._feeding: dict[int, _Feed] = {}
        self._unacked = 0
        self._batch: list[Buffer] = []
        self._batch_size = 0
        self._batch_limit = connection._max_datagram_size
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._settle_handle: asyncio.Handle | None = None
        self._turn: asyncio.Handle | None = None
        self._in_process = False
        self._new_data = False
        self._app_space: Any = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self.created_at = self.last_receive = self.loop.time()
        """When the last datagram arrived (loop time); created_at until one does."""
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.fingerprint_check: Callable[[QuicStream], HandshakeError | None] | None = None
        self.resumed_cert: Any = None
        """The certificate stored with the session ticket this client offered (if any)."""
        self._finished = False
        self._closing = False
        self._flushed: asyncio.Future[None] | None = None
        self._end_on_resume: Exception | None = None
        """A clean end behind data the receiver paused before reading: reported on resume."""
        self.pings_acknowledged = 0

    # -- I/O entry points (called by the driver) ---------------------------
    def datagram_received(self, data: bytes, address: Any, now: float) -> None:
        """Feed one datagram; call :meth:`process` after a batch."""
        self.connection.receive_datagram(data, address, now)
        self.last_receive = now

    def process(self) -> None:
        """Handle what the connection produced, deliver data, send what is due."""
        connection = self.connection
        self._in_process = True
        while (event := connection.next_event()) is not None:
            kind = type(event)
            if kind is StreamDataReceived:
                self._stream_data(event)  # type: ignore[arg-type]
            elif kind is HandshakeCompleted:
                self._handshake_completed(event)  # type: ignore[arg-type]
            elif kind is ConnectionIdIssued:
                self._driver.cid_issued(event.connection_id, self)  # type: ignore[attr-defined]
            elif kind is ConnectionIdRetired:
                self._driver.cid_retired(event.connection_id)  # type: ignore[attr-defined]
            elif kind is ConnectionTerminated:
                self._terminated(event)  # type: ignore[arg-type]
            elif kind is StreamReset:
                self._protocol_error(f"QUIC stream {event.stream_id} was reset")  # type: ignore[attr-defined]
            elif kind is PingAcknowledged:
                self.pings_acknowledged += 1
        if not self._finished:
            close_event = connection._close_event
            if close_event is not None and not self._closing:
                # the peer closed, or the TLS stack rejected the handshake: aioquic only
                # reports it after the draining period, we report it at once
                self._terminated(close_event)
            else:
                self._deliver()
                self._in_process = False
                # the bookkeeping (ACKed bytes, timers, ACK-only packets) waits one loop turn:
                # a reply written while delivering leaves first, and so does the next request
                # of a caller the data woke up (carrying the pending ACK with it)
                if self._settle_handle is None:
                    self._settle_handle = self.loop.call_soon(self._settle)
                if self._transmit_handle is not None:
                    self.transmit()
                return
        self._in_process = False
        self._send_or_arm()

    def _settle(self) -> None:
        self._settle_handle = None
        if not self._finished:
            self._acks_processed()
            self._send_or_arm()

    def _send_or_arm(self) -> None:
        if self._transmit_handle is not None or self._may_send():
            self.transmit()
        else:
            self._arm_timer()

    def _may_send(self) -> bool:
        """Whether a packet could be due now (else building one would only find nothing).

        Conservative: anything unusual means yes. ACKs, flow-control credit and stream
        limits that are not due now leave with the next packet, at the latest when the
        ACK timer fires.
        """
        connection = self.connection
        space = self._app_space
        if (
            space is None
            or not connection._handshake_confirmed
            or self._batch
            or connection._close_pending
            or connection._ping_pending
            or connection._probe_pending
            or connection._streams_blocked_pending
            or connection._handshake_done_pending
            or connection._retire_connection_ids
            or connection._datagrams_pending
        ):
            return True
        if space.ack_at is not None and space.ack_at <= self.loop.time():
            return True
        path = connection._network_paths[0]
        if path.remote_challenges or not path.is_validated:
            return True
        if not self._crypto_sender.buffer_is_empty:
            return True
        for sender in self._sending.values():
            if not sender.buffer_is_empty:
                return True
        if self._feeding:
            return True  # aioquic sent all it holds of a large unit: hand it the next chunk
        return any(not cid.was_sent for cid in connection._host_cids)

    def transmit(self) -> None:
        """Send every datagram the connection has ready and re-arm its timer."""
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self._batch:
            self._flush_batch()
        if self._feeding:
            self._top_up()
        now = self.loop.time()
        if self._new_data:
            # aioquic only sends an ACK once its 1 ms delay is due; when data is leaving
            # anyway, let the pending ACK ride along instead of costing its own packet later
            self._new_data = False
            space = self._app_space
            if space is not None and space.ack_at is not None:
                space.ack_at = now
        datagrams = self.connection.datagrams_to_send(now)
        if datagrams:
            self._driver.send(datagrams)
        if not self._finished:
            self._arm_timer()

    def _arm_timer(self) -> None:
        timer_at = self.connection.get_timer()
        current = self._timer_at
        if timer_at is not None and current is not None and current <= timer_at:
            return  # an earlier wake-up is harmless: _fire() re-arms for the real deadline
        if timer_at != current:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = timer_at
            self._timer = None if timer_at is None else self.loop.call_at(timer_at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.connection.handle_timer(self.loop.time())
        self.process()

    def _end_turn(self) -> None:
        self._turn = None

    def _schedule_transmit(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self.loop.call_soon(self.transmit)

    # -- connection events ---------------------------------------------------
    def _handshake_completed(self, event: HandshakeCompleted) -> None:
        tls = self.connection.tls
        self.extra["alpn"] = event.alpn_protocol
        self.extra["tls_version"] = "TLSv1.3"
        self.extra["session_resumed"] = event.session_resumed
        self.extra["cipher"] = getattr(tls.key_schedule, "cipher_suite", None)
        cert = getattr(tls, "_peer_certificate", None)
        if cert is None and event.session_resumed:
            cert = self.resumed_cert  # a resumed handshake presents no certificate
        self.extra["peer_cert"] = cert
        self.extra["mtu"] = self.connection._max_datagram_size
        self._app_space = self.connection._spaces.get(tls_epoch.ONE_RTT)
        self._crypto_sender = self.connection._crypto_streams[tls_epoch.ONE_RTT].sender
        # aioquic keeps a 16 KiB TLS output buffer per epoch (Initial, Handshake, 1-RTT) for
        # the connection's life; none is written again once the handshake is complete: the
        # server's last TLS output (Finished's reply, the session ticket) was already moved to
        # the crypto streams' send buffers before this event, and after the handshake aioquic's
        # TLS writes nothing (a client only reads NewSessionTicket, a server refuses any
        # message with an alert before touching its output), and retransmissions come from the
        # crypto streams: ~30 KiB of RSS per connection
        self.connection._crypto_buffers.clear()
        if self.fingerprint_check is not None:
            error = self.fingerprint_check(self)
            if error is not None:
                self.connection.close(
                    CRYPTO_ERROR + 42, reason_phrase="certificate fingerprint mismatch"
                )
                self._finish(error)
                return
        tick = self._probe or self._keepalive
        if tick:
            self._keepalive_handle = self.loop.call_later(tick, self._keepalive_tick)
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._driver.established(self)

    def _keepalive_tick(self) -> None:
        """PING after silence: every ``keepalive`` s when idle, every ``probe`` s while active.

        Active means application data moved (either way) within the last ``keepalive``
        seconds, e.g. a call waiting for its reply: a PING then soon shows whether the peer
        is still there (a dead server's port answers with ICMP, see :meth:`peer_refused`),
        while idle connections cost one PING per ``keepalive`` only.
        """
        if self._finished:
            return
        now = self.loop.time()
        activity = (
            self._sent_ordered
            + self._sent_unordered
            + self._delivered_ordered
            + self._delivered_unordered
        )
        if activity != self._activity:
            self._activity = activity
            self._active_until = now + self._keepalive
        interval = self._probe if self._probe and now < self._active_until else self._keepalive
        if interval and now - self.last_receive >= interval * 0.9:
            self._ping()
        tick = self._probe or self._keepalive
        self._keepalive_handle = self.loop.call_later(tick, self._keepalive_tick)

    def _ping(self) -> None:
        if not self._finished:
            self.connection.send_ping(next(_ping_ids))
            self.transmit()

    def peer_refused(self) -> None:
        """The peer's address answered with ICMP port unreachable (a connected socket only).

        RFC 9000 warns that ICMP is easily spoofed, so one refusal only triggers probes;
        the connection is lost after :data:`REFUSALS_FOR_LOSS` refusals with no packet
        from the peer in between (a live peer's ACK of the probe resets the count).
        """
        if self._finished or not self.handshake.done():
            return
        if self._refused_at_receive != self.last_receive:
            self._refused_at_receive = self.last_receive
            self._refusals = 0
        self._refusals += 1
        if self._refusals >= REFUSALS_FOR_LOSS:
            self.connection.close(ABORT_ERROR, reason_phrase="peer unreachable")
            self._finish(
                ConnectionLost(
                    f"quic: connection to {self.extra['peer']} lost: the peer's port is closed "
                    "(ICMP port unreachable; the peer process is gone)"
                )
            )
            return
        self.loop.call_later(REFUSAL_PROBE_DELAY, self._ping)

    def _terminated(self, event: ConnectionTerminated) -> None:
        if self._finished:
            return
        if not self.handshake.done():
            self._finish(handshake_error(event, self))
            return
        if self._closing:
            self._finish(None)
            return
        code, reason = event.error_code, event.reason_phrase
        if code == NO_ERROR and event.frame_type is None:
            exc = ConnectionLost(f"quic: the peer closed the connection ({reason or 'no reason'})")
            self._finish(exc, graceful=True)
        elif reason == IDLE_REASON:
            idle = self.connection._idle_timeout()
            self._finish(
                ConnectionLost(
                    f"quic: connection to {self.extra['peer']} lost: no packets for {idle:.3g}s "
                    "(idle timeout; the peer is gone or the network is down)"
                )
            )
        else:
            what = "reset by the peer" if event.frame_type is None else "closed with an error"
            self._finish(
                ConnectionLost(
                    f"quic: connection {what} (code 0x{code:x}: {reason or 'no reason'})"
                )
            )

    def _finish(self, exc: Exception | None, *, graceful: bool = False) -> None:
        """Tear down once: fail the handshake or report the loss, release timers and routes."""
        if self._finished:
            return
        self._finished = True
        handles = (self._timer, self._keepalive_handle, self._transmit_handle, self._settle_handle)
        for handle in handles:
            if handle is not None:
                handle.cancel()
        self._timer = self._keepalive_handle = self._transmit_handle = self._settle_handle = None
        self._feeding.clear()
        if self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionLost("quic: connection closed"))
            self.handshake.exception()
            self._lost = exc or ConnectionLost("quic: connection closed")
        elif graceful:
            # like a TCP FIN behind unread bytes: what arrived is delivered first, and while
            # the receiver keeps reading paused, the data, the EOF and the end wait for it
            self._end_on_resume = exc
            self._end_gracefully()
        else:
            self._connection_lost(None if self._closed else exc)
        self.transmit()
        self._driver.finished(self)
        # aioquic's connection holds reference cycles of its own (its key-update callbacks);
        # its only way back to this stream goes here, so the stream is freed at once
        credit = self.connection._local_max_data
        if isinstance(credit, ReceiveCredit):
            credit._held = _nothing_held

    # -- receiving -------------------------------------------------------------
    def _stream_data(self, event: StreamDataReceived) -> None:
        stream_id = event.stream_id
        data = event.data
        state = self._incoming.get(stream_id)
        if state is None:
            if not data:
                if event.end_stream:
                    self._protocol_error(f"empty QUIC stream {stream_id}")
                return
            kind = data[0]
            if not stream_id & 2:
                self._protocol_error(f"bidirectional QUIC stream {stream_id} is not used")
                return
            if kind == UNIT:
                state = self._incoming[stream_id] = []
            elif kind == CHANNEL:
                state = OrderedChannel()
                self._incoming[stream_id] = state
            elif kind == EOF and len(data) > 1 and event.end_stream:
                self._eof_after = _read_counts(data)
                self._deliver_eof()
                return
            else:
                self._protocol_error(f"unknown QUIC stream kind {kind} on stream {stream_id}")
                return
            data = memoryview(data)[1:]  # type: ignore[assignment]  # the unit's bytes
        if type(state) is list:
            if data:
                state.append(data)
            if event.end_stream:
                del self._incoming[stream_id]
                if not state:
                    self._protocol_error(f"empty unit on QUIC stream {stream_id}")
                    return
                self._ready.append((state, False))
                self._ready_bytes += sum(map(len, state))
        else:
            try:
                units = state.feed(data)  # type: ignore[union-attr]  # not a list: a channel
            except ValueError as exc:
                self._protocol_error(str(exc))
                return
            for unit in units:
                self._ready.append((unit, True))
                self._ready_bytes += sum(map(len, unit))
            if event.end_stream:
                del self._incoming[stream_id]

    def _protocol_error(self, reason: str) -> None:
        self.connection.close(PROTOCOL_ERROR, reason_phrase=reason)
        self._finish(ConnectionLost(f"quic: the peer broke the polyrpc stream rules: {reason}"))

    def _deliver(self) -> None:
        ready = self._ready
        receiver = self.receiver
        while ready and not self._reading_paused:
            chunks, ordered = ready.popleft()
            for chunk in chunks:
                self._ready_bytes -= len(chunk)
                receiver.data_received(chunk)
            if ordered:
                self._delivered_ordered += 1
            else:
                self._delivered_unordered += 1
        if self._eof_after is not None:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        unordered, ordered = self._eof_after  # type: ignore[misc]
        if (
            not self._eof_delivered
            and not self._reading_paused
            and self._delivered_unordered >= unordered
            and self._delivered_ordered >= ordered
        ):
            self._eof_delivered = True
            self.receiver.eof_received()

    def _end_gracefully(self) -> None:
        """Deliver what is ready, then the EOF and the end, unless reading is paused."""
        self._deliver()
        if self._reading_paused:
            return
        exc, self._end_on_resume = self._end_on_resume, None
        if not self._eof_delivered:
            self._eof_delivered = True
            self.receiver.eof_received()
        self._connection_lost(None if self._closed else exc)

    def _drop_deferred_end(self) -> None:
        """Close or abort after a deferred clean end: unread data is dropped, the end reported."""
        exc, self._end_on_resume = self._end_on_resume, None
        if exc is not None:
            self._ready.clear()
            self._connection_lost(None)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._end_on_resume is not None:
            self._end_gracefully()
        elif not self._finished:
            self._deliver()
            self._schedule_transmit()  # lets the connection grant credit again

    # -- sending ---------------------------------------------------------------
    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        self._check_writable()
        size = 0
        for buf in buffers:
            size += len(buf)
        if not size:
            return
        connection = self.connection
        if ordered:
            stream_id = self._channel_id
            if stream_id is None:
                stream_id = self._channel_id = self._open(CHANNEL_HEADER)
            if size < JOIN_LIMIT:
                # one C-level join beats one aioquic call (and bytearray append) per buffer
                connection.send_stream_data(stream_id, b"".join([encode_uint_var(size), *buffers]))
            else:
                connection.send_stream_data(stream_id, encode_uint_var(size))
                for buf in buffers:
                    connection.send_stream_data(stream_id, buf)  # type: ignore[arg-type]  # any buffer
            self._sent_ordered += 1
            self._unacked += size
        elif size < self._batch_limit and not self._batch and self._express_idle():
            # nothing is outstanding on the express channel, so nothing can hold this unit
            # back there: reuse that stream instead of opening (and retiring) a new one
            stream_id = self._express_id
            if stream_id is None:
                stream_id = self._express_id = self._open(CHANNEL_HEADER)
                self._express = connection._streams[stream_id].sender
            connection.send_stream_data(stream_id, b"".join([encode_uint_var(size), *buffers]))
            self._sent_ordered += 1
            self._unacked += size
        elif size < self._batch_limit:
            # small units written in the same loop turn would share packets anyway, so they
            # share one QUIC stream too (flushed by transmit(), at most one datagram's worth)
            if self._batch_size + size > self._batch_limit:
                self._flush_batch()
            self._batch += buffers
            self._batch_size += size
        else:
            self._send_unordered(buffers, size)
        self._new_data = True
        if self._transmit_handle is None:
            if self._in_process or self._turn is not None:
                self._transmit_handle = self.loop.call_soon(self.transmit)
            else:
                # the first write of a loop turn goes out at once (latency); later ones in
                # the same turn are sent together by the scheduled transmit (rate)
                self.transmit()
                self._turn = self.loop.call_soon(self._end_turn)
        if not self.writing_paused and self._unacked + self._batch_size > self.high_water:
            self._update_write_pressure()

    def _express_idle(self) -> bool:
        express = self._express
        return express is None or express._buffer_start == express._buffer_stop

    def _send_unordered(self, buffers: Sequence[Buffer], size: int) -> None:
        connection = self.connection
        stream_id = connection.get_next_available_stream_id(is_unidirectional=True)
        if size < JOIN_LIMIT:
            connection.send_stream_data(stream_id, b"".join([UNIT_HEADER, *buffers]), True)
            self._sending[stream_id] = connection._streams[stream_id].sender
        else:
            # a large unit is handed over in chunks as aioquic sends them: the writer's memory
            # is not doubled, and a 32 MiB write does not stall the loop with one big copy
            connection.send_stream_data(stream_id, UNIT_HEADER)
            sender = self._sending[stream_id] = connection._streams[stream_id].sender
            views = deque(
                memoryview(buf if type(buf) is bytes else bytes(buf)).cast("B") for buf in buffers
            )  # bytes cannot change under us; anything mutable is copied now
            self._feeding[stream_id] = _Feed(sender, views, size)
            self._top_up()
        self._sent_unordered += 1
        self._unacked += size

    def _top_up(self) -> None:
        """Give each large unit's QUIC stream its next chunks while aioquic holds little unsent.

        aioquic serves streams round-robin, one frame per stream per packet; what it holds
        unsent is kept to :data:`FEED_AHEAD` plus what it may send next: the congestion
        window's free room, no more than the peer's flow-control credit (a slow reader's
        data cannot leave anyway) and :data:`FEED_WINDOW_CAP`.
        """
        connection = self.connection
        loss = connection._loss
        window = loss.congestion_window - loss.bytes_in_flight
        credit = connection._remote_max_data - connection._remote_max_data_used
        room = FEED_AHEAD + max(0, min(window, credit, FEED_WINDOW_CAP))
        done = []
        for stream_id, feed in self._feeding.items():
            sender = feed.sender
            queued = sender._buffer_stop - sender.highest_offset
            buffers = feed.buffers
            while queued < room and buffers:
                chunk = buffers[0]
                take = room - queued
                if len(chunk) > take:
                    buffers[0] = chunk[take:]
                    chunk = chunk[:take]
                else:
                    buffers.popleft()
                feed.remaining -= len(chunk)
                connection.send_stream_data(stream_id, chunk, not buffers)  # type: ignore[arg-type]
                queued += len(chunk)
            if not buffers:
                done.append(stream_id)
        for stream_id in done:
            del self._feeding[stream_id]

    def _flush_batch(self) -> None:
        if self._batch:
            batch, size = self._batch, self._batch_size
            self._batch, self._batch_size = [], 0
            self._send_unordered(batch, size)

    def _open(self, header: bytes) -> int:
        """Open a unidirectional QUIC stream whose first byte says what it carries."""
        connection = self.connection
        stream_id = connection.get_next_available_stream_id(is_unidirectional=True)
        connection.send_stream_data(stream_id, header)
        self._sending[stream_id] = connection._streams[stream_id].sender
        return stream_id

    def _acks_processed(self) -> None:
        sending = self._sending
        unacked = 0
        if sending:
            finished = []
            for stream_id, sender in sending.items():
                if sender.is_finished:
                    finished.append(stream_id)
                else:
                    unacked += sender._buffer_stop - sender._buffer_start
            for stream_id in finished:
                del sending[stream_id]
        for feed in self._feeding.values():
            unacked += feed.remaining
        self._unacked = unacked
        self._update_write_pressure()
        if self._flushed is not None and not self.write_buffer_size and not self._flushed.done():
            self._flushed.set_result(None)

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet acknowledged by the peer."""
        return self._unacked + self._batch_size

    def write_eof(self) -> None:
        self._check_writable()
        self._flush_batch()
        counts = encode_uint_var(self._sent_unordered) + encode_uint_var(self._sent_ordered)
        stream_id = self._open(EOF_HEADER)
        self.connection.send_stream_data(stream_id, counts, True)
        for channel in (self._channel_id, self._express_id):
            if channel is not None:
                self.connection.send_stream_data(channel, b"", True)
        self._eof_sent = True
        self._schedule_transmit()

    def _check_writable(self) -> None:
        super()._check_writable()
        if self._end_on_resume is not None:
            raise fresh_error(self._end_on_resume)
        if self._eof_sent:
            raise ConnectionLost("quic stream: write after write_eof()")

    # -- closing ---------------------------------------------------------------
    async def close(self, reason: str = "closed") -> None:
        """Graceful close: wait until the peer acknowledged everything, then CONNECTION_CLOSE."""
        if self._closed or self._finished:
            self._closed = True
            self._drop_deferred_end()
            return
        self._closed = True
        if self.write_buffer_size:
            self._flushed = self.loop.create_future()
            self.transmit()
            try:
                await asyncio.wait_for(asyncio.shield(self._flushed), CLOSE_TIMEOUT)
            except TimeoutError:
                reason = f"{reason} (unacknowledged data dropped after {CLOSE_TIMEOUT:g}s)"
        if self._finished:
            return
        self._closing = True
        self.connection.close(NO_ERROR, reason_phrase=reason)
        self._finish(None)

    def abort(self) -> None:
        if self._finished:
            self._closed = True
            self._drop_deferred_end()
            return
        self._closed = True
        self._closing = True
        self.connection.close(ABORT_ERROR, reason_phrase="aborted")
        self._finish(None)


def _format(address: Any) -> Any:
    if isinstance(address, tuple) and len(address) >= 2:
        return (address[0], address[1])
    return address


def handshake_error(event: ConnectionTerminated, stream: QuicStream) -> HandshakeError | Exception:
    """Turn a connection that ended before its handshake into a readable, classified error."""
    from ...errors import ConnectFailed

    peer = stream.extra.get("peer")
    code, reason = event.error_code, event.reason_phrase or ""
    alert = code - CRYPTO_ERROR if CRYPTO_ERROR <= code < CRYPTO_ERROR + 256 else None
    if alert == ALERT_NO_APPLICATION_PROTOCOL:
        return HandshakeError(
            f"quic handshake with {peer} failed: the server does not speak polyrpc/1 "
            f"(ALPN negotiation failed: {reason or 'no common protocol'})",
            "alpn",
        )
    if alert in CERTIFICATE_ALERTS:
        lowered = reason.lower()
        if "doesn't match" in lowered or "hostname" in lowered or "ip address" in lowered:
            return HandshakeError(
                f"quic handshake with {peer} failed: hostname mismatch ({reason}); dial the "
                "name in the certificate or set ?sni=",
                "hostname_mismatch",
            )
        return HandshakeError(
            f"quic handshake with {peer} failed: untrusted certificate ({reason}); pass the "
            "issuing CA with ?ca=/path/ca.pem or pin it with ?fingerprint=",
            "untrusted_certificate",
        )
    if alert is not None:
        return HandshakeError(
            f"quic handshake with {peer} failed: TLS alert {alert} ({reason})", "tls"
        )
    if code == TRANSPORT_CONNECTION_REFUSED and event.frame_type is not None:
        return ConnectFailed(
            f"quic: {peer} refused the connection: too many connections are in the handshake "
            "(the server is busy or under a flood; try again)"
        )
    if code == TRANSPORT_INVALID_TOKEN and event.frame_type is not None:
        return ConnectFailed(f"quic: {peer} rejected the address-validation token")
    if reason == IDLE_REASON:
        if stream.last_receive == stream.created_at:
            return ConnectFailed(f"quic: no answer from {peer} (is a QUIC server listening there?)")
        return ConnectFailed(
            f"quic: the handshake with {peer} stalled: it answered, then nothing more arrived "
            "until the idle timeout (heavy packet loss?)"
        )
    return ConnectFailed(
        f"quic: connection to {peer} closed during the handshake (code 0x{code:x}: "
        f"{reason or 'no reason'})"
    )
