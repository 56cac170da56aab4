"""asyncio glue: KCP sessions on UDP sockets, a small open/close handshake, KcpStream.

One :class:`Mux` per UDP socket (one per listener, one per dialled stream). The C
multiplexer does the per-datagram work (recvmmsg, KCP input, sendmmsg); Python runs
once per readable socket, per timer deadline the C side computes, and per write (the
session above batches a loop turn's writes), and only handles events.

KCP has no connection set-up or tear-down, so polyrpc adds control datagrams with
the same 24-byte header shape and commands outside KCP's range (see
docs/transports/kcp.md): SYN/COOKIE/SYN/SYNACK open (a listener answers a SYN from an
unverified address statelessly, in C, with a cookie the client must echo), FIN/FINACK
close (FIN carries the sequence number after the last data segment, so EOF is delivered
only once all data has arrived), RST aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConnectFailed, ConnectionLost
from ...stream.trait import Buffer, BufferedReceiver, HalfClose, Stream, StreamReceiver
from .engine import STAT_FIELDS, ffi, lib

MAGIC = 0x50524B31  # "PRK1": a polyrpc KCP peer, handshake version 1
EVENTS = 512
READ_CHUNK = 64 << 10
COALESCE_LIMIT = 16 << 10
LISTENER_BATCH = 64
DIALER_BATCH = 16
SOCKET_BUFFER = 4 << 20
CLOSE_TIMEOUT = 10.0
FIN_RETRY = 0.1
FIN_RETRY_MAX = 1.0
FULL_CLOSE = 1
ACK_BATCH = 16
COOKIE_BUCKET_MS = 5000
"""A listener's SYN cookies change their secret this often; one is valid 1 to 2 buckets."""
BUSY = 1
"""RST ``frg`` bit: the listener is at its handshake cap (``backlog``), try again later."""

EV_DATA, EV_CTRL, EV_DEAD, EV_WRITABLE, EV_ERROR = 1, 2, 3, 4, 5
SYN, SYNACK, FIN, FINACK, RST, COOKIE = 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5
DEAD_LINK, DEAD_IDLE, DEAD_UNREACHABLE = 1, 2, 3


MUX_STAT_FIELDS = (
    "datagrams_in",
    "datagrams_out",
    "bytes_in",
    "bytes_out",
    "dropped_short",
    "dropped_oversize",
    "dropped_bad_cmd",
    "dropped_unknown",
    "dropped_malformed",
    "send_drops",
    "resets_sent",
    "syscalls_in",
    "syscalls_out",
    "cookies_sent",
    "cookies_accepted",
    "icmp_errors",
    "peers_unreachable",
    "sessions",
)


@dataclass(frozen=True)
class KcpConfig:
    """Per-session KCP settings (from the URL options)."""

    mode: str
    nodelay: int
    interval: int
    resend: int
    nocwnd: int
    mtu: int
    sndwnd: int
    rcvwnd: int
    timeout: float
    keepalive: float = 1.0
    backlog: int = 512

    def cdata(self) -> Any:
        """The settings as a C ``kmux_config``."""
        cfg = ffi.new("kmux_config *")
        cfg.mtu, cfg.sndwnd, cfg.rcvwnd = self.mtu, self.sndwnd, self.rcvwnd
        cfg.nodelay, cfg.interval = self.nodelay, self.interval
        cfg.resend, cfg.nocwnd = self.resend, self.nocwnd
        cfg.stream = 1
        cfg.dead_link = 20 if self.mode == "normal" else 30
        cfg.ack_delay, cfg.ack_batch = self.ack_delay_ms, ACK_BATCH
        return cfg

    @property
    def ack_delay_ms(self) -> int:
        """How long a pure ack may wait for a reply to carry it: half the KCP interval, as
        the reference's acks wait on average for its next update tick."""
        return self.interval // 2

    @property
    def idle_ms(self) -> int:
        """Silence after which the peer is declared dead."""
        return int(self.timeout * 1000)

    @property
    def keepalive_ms(self) -> int:
        """How long a session may stay silent before it sends a keepalive (a KCP WINS): the
        ``keepalive`` option, at most a quarter of ``timeout``. A keepalive to a peer whose
        process is gone draws an ICMP port unreachable, which ends the session at once."""
        return max(100, min(int(self.keepalive * 1000), int(self.timeout * 1000) // 4))


def pack_address(host: str, port: int) -> bytes:
    """A numeric host and port as raw sockaddr bytes for the C side."""
    out = ffi.new("uint8_t[28]")
    n = lib.kaddr_pack(host.encode(), port, out)
    if n < 0:
        raise ValueError(f"not a numeric IP address: {host!r}")
    return bytes(ffi.buffer(out, n))


def unpack_address(raw: bytes) -> tuple[str, int]:
    """Raw sockaddr bytes as (host, port)."""
    host = ffi.new("char[64]")
    port = ffi.new("int *")
    if lib.kaddr_unpack(raw, len(raw), host, 64, port) < 0:
        return ("?", 0)
    return ffi.string(host).decode(), port[0]


def make_socket(family: int) -> socket.socket:
    """A non-blocking UDP socket with buffers big enough for a full KCP window burst."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        try:
            if force is None:
                raise OSError
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return sock


class Mux:
    """One UDP socket and its C multiplexer; dispatches C events to streams and the acceptor."""

    def __init__(
        self,
        sock: socket.socket,
        acceptor: Callable[[int, bytes, int, int], None] | None = None,
        *,
        connected: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        # a listener's socket carries many sessions; a dialled socket only one
        raw = lib.kmux_new(sock.fileno(), LISTENER_BATCH if acceptor else DIALER_BATCH)
        if raw == ffi.NULL:
            raise MemoryError("kmux_new failed")
        self.c = raw
        lib.kmux_set_connected(raw, int(connected))
        if acceptor is not None:
            # a listener: SYNs answered statelessly in C, ICMP errors read per peer
            if lib.kmux_set_cookies(raw, COOKIE_BUCKET_MS) < 0:
                lib.kmux_free(raw)
                raise OSError("no randomness for the kcp SYN cookie secret (getrandom failed)")
            lib.kmux_set_recverr(raw, 1)
        self.acceptor = acceptor
        self.streams: dict[int, KcpStream] = {}
        self.events = ffi.new("kmux_event[]", EVENTS)
        self.buffer = bytearray(READ_CHUNK)
        self.buffer_c = ffi.from_buffer(self.buffer)
        self.view = memoryview(self.buffer)
        self._flush_scheduled = False
        self._busy = False
        self._in_poll = False
        self._out = ffi.new("int32_t[2]")
        self._timer_fd = lib.kmux_timer_fd(raw)
        self._poll_fd = lib.kmux_poll_fd(raw)  # the socket, seen through an epoll fd
        self.hint: KcpStream | None = None
        self.closed = False
        self.keep_open = acceptor is not None
        self.loop.add_reader(self._poll_fd, self._on_readable)
        self.loop.add_reader(self._timer_fd, self._on_timer)

    # -- running the C side -------------------------------------------------
    def _on_readable(self) -> None:
        if self.closed:
            return
        # The stream that read last (a dialled socket's only one) gets its bytes copied by
        # C straight into its receiver's buffer as part of the poll.
        hint = self.hint
        out = self._out
        self._busy = self._in_poll = True
        try:
            if hint is not None and not hint._paused:
                get_buffer = hint._get_buffer
                if get_buffer:
                    # the export ends before any Python code runs (see _deliver)
                    target = ffi.from_buffer(get_buffer(READ_CHUNK), require_writable=True)
                    try:
                        n = lib.kmux_poll(
                            self.c, self.events, EVENTS, hint.sid, target, len(target), out
                        )
                    finally:
                        ffi.release(target)
                else:
                    target = self.buffer_c
                    n = lib.kmux_poll(
                        self.c, self.events, EVENTS, hint.sid, target, len(target), out
                    )
                got = out[0]
                if got:
                    if hint.on_first_data is not None:
                        hint._left_handshake()
                    buffer_updated = hint._buffer_updated
                    if buffer_updated is not None:
                        buffer_updated(got)
                    else:
                        self.deliver_copy(hint.receiver, got)
                    if hint._peer_fin_sn is not None:
                        hint._check_eof()
            else:
                n = lib.kmux_poll(self.c, self.events, EVENTS, -1, ffi.NULL, 0, out)
            if n:
                self._dispatch(n)
        finally:
            self._busy = self._in_poll = False
        if not self.closed and lib.kmux_has_dirty(self.c):
            self._flush()

    def deliver_copy(self, receiver: Any, n: int) -> None:
        """Hand the first ``n`` bytes of the shared read buffer to a plain receiver; the view
        is released when it returns (the buffer is reused: receivers copy what they keep)."""
        view = self.view[:n]
        try:
            receiver.data_received(view)
        finally:
            view.release()

    def want_flush(self) -> None:
        """Something was written or read: send it now (the session above already batches
        the writes of one loop turn); while events are dispatched, once they are done."""
        if self.closed or self._in_poll:  # the flush that ends the poll will send it
            return
        if not self._busy:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Send what every touched session has to say (acks, data, window updates)."""
        self._flush_scheduled = False
        if not self.closed and lib.kmux_has_dirty(self.c):
            self._flush()

    def _flush(self) -> None:
        if not self.closed:
            self.handle_events(lib.kmux_flush(self.c, self.events, EVENTS))

    def handle_events(self, n: int) -> None:
        """Dispatch the ``n`` events a flush or tick reported."""
        if n:
            self._busy = True
            try:
                self._dispatch(n)
            finally:
                self._busy = False

    def _on_timer(self) -> None:
        """The C side's timerfd fired: retransmissions, delayed acks, probes, keepalives."""
        if not self.closed:
            self.handle_events(lib.kmux_tick(self.c, self.events, EVENTS))

    def _dispatch(self, n: int) -> None:
        events, streams = self.events, self.streams
        for i in range(n):
            e = events[i]
            kind = e.type
            if kind == EV_DATA:
                stream = streams.get(e.sid)
                if stream is not None:
                    stream._deliver()
            elif kind == EV_CTRL:
                addr = bytes(ffi.buffer(e.addr, e.addrlen))
                self._on_control(e.sid, e.cmd, e.frg, e.conv, e.ts, e.sn, e.una, addr)
            elif kind == EV_ERROR:
                self._on_socket_error(e.err)
            else:
                stream = streams.get(e.sid)
                if stream is None:
                    continue
                if kind == EV_WRITABLE:
                    stream._on_writable()
                elif kind == EV_DEAD:
                    stream._on_dead(e.err)

    def _on_control(
        self, sid: int, cmd: int, frg: int, conv: int, ts: int, sn: int, una: int, addr: bytes
    ) -> None:
        stream = self.streams.get(sid) if sid >= 0 else None
        if cmd == SYN:
            if una != MAGIC:
                return
            if stream is not None:
                self.control(addr, conv, SYNACK, 0, 0, MAGIC)
            elif self.acceptor is not None:  # C checked its cookie: the address is real
                self.acceptor(conv, addr, sn, una)
            else:
                self.control(addr, conv, RST)
        elif stream is None:
            if cmd == FIN:  # the session is already gone: the peer still needs its answer
                self.control(addr, conv, FINACK, frg, sn)
        elif cmd == SYNACK:
            stream._on_synack(una)
        elif cmd == COOKIE:
            stream._on_cookie(ts, sn, una)
        elif cmd == FIN:
            self.control(addr, conv, FINACK, frg, sn)
            stream._on_fin(sn, bool(frg & FULL_CLOSE))
        elif cmd == FINACK:
            stream._on_finack(bool(frg & FULL_CLOSE))
        elif cmd == RST:
            stream._on_rst(bool(frg & BUSY))

    def _on_socket_error(self, err: int) -> None:
        if self.acceptor is not None:
            return  # an unconnected listener socket: ICMP errors are not ours to act on
        for stream in list(self.streams.values()):
            stream._on_socket_error(err)

    # -- helpers for streams ------------------------------------------------
    def control(
        self,
        addr: bytes,
        conv: int,
        cmd: int,
        frg: int = 0,
        sn: int = 0,
        una: int = 0,
        ts: int = 0,
    ) -> None:
        """Send one control datagram at once."""
        if not self.closed:
            lib.kmux_ctrl(self.c, addr, len(addr), conv, cmd, frg, ts, sn, una)

    def open_session(self, addr: bytes, conv: int, config: KcpConfig) -> int:
        """Create the C session for (addr, conv); returns its id."""
        sid = lib.kmux_open(self.c, addr, len(addr), conv, config.cdata())
        if sid < 0:
            raise ConnectFailed(f"could not create a kcp session (error {sid})")
        return sid

    def release(self, sid: int) -> None:
        """Free a session's C state; closes the socket when nothing needs it any more."""
        stream = self.streams.pop(sid, None)
        if stream is not None and stream is self.hint:
            self.hint = None
        if not self.closed:
            lib.kmux_release(self.c, sid)
        if not self.streams and not self.keep_open:
            self.close()

    def stats(self) -> dict[str, int]:
        """Socket-level counters: datagrams, bytes, drops by reason, system calls, sessions."""
        st = ffi.new("kmux_stats *")
        lib.kmux_get_stats(self.c, st)
        return {name: getattr(st, name) for name in MUX_STAT_FIELDS}

    def close(self) -> None:
        """Stop reading, free every C session and close the socket."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self._poll_fd)
        self.loop.remove_reader(self._timer_fd)
        lib.kmux_free(self.c)
        self.c = ffi.NULL
        self.sock.close()


def _coalesce(buffers: Sequence[Buffer]) -> list[Buffer]:
    """Join runs of small buffers (one C call each instead of one per buffer); large ones
    pass as they are, uncopied. Empty buffers are dropped."""
    out: list[Buffer] = []
    small: list[Buffer] = []
    for buf in buffers:
        size = len(buf)
        if size >= COALESCE_LIMIT:
            if small:
                out.append(b"".join(small) if len(small) > 1 else small[0])
                small = []
            out.append(buf)
        elif size:
            small.append(buf)
    if small:
        out.append(b"".join(small) if len(small) > 1 else small[0])
    return out


class KcpStream(Stream, HalfClose):
    """A reliable byte stream over one KCP session (stream mode) of a :class:`Mux`."""

    transport_name = "kcp"

    def __init__(
        self,
        mux: Mux,
        sid: int,
        conv: int,
        peer: bytes,
        config: KcpConfig,
        *,
        established: bool,
    ) -> None:
        host, port = unpack_address(peer)
        local = mux.sock.getsockname()
        super().__init__(
            {
                "peer": (host, port),
                "local": (local[0], local[1]),
                "mtu": config.mtu,
                "conv": conv,
                "mode": config.mode,
            }
        )
        self.mux = mux
        self.sid = sid
        self.conv = conv
        self.peer = peer
        self.config = config
        self._engine = lib.kmux_engine(mux.c, sid)
        self._paused = False
        self._get_buffer: Callable[[int], memoryview] | None = None
        self._buffer_updated: Callable[[int], object] | None = None
        self._deliver_scheduled = False
        self._peer_fin_sn: int | None = None
        self._peer_full_close = False
        self._eof_delivered = False
        self._fin_sent = False
        self._fin_acked = False
        self._fin_full = False
        self._fin_sn = 0
        self._fin_timer: asyncio.TimerHandle | None = None
        self._fin_delay = FIN_RETRY
        self._connected: asyncio.Future[None] | None = None
        self._cookie = 0
        self.on_first_data: Callable[[], None] | None = None
        self._done: asyncio.Future[None] = mux.loop.create_future()
        self._gone = False
        mux.streams[sid] = self
        if established:
            self._establish()
        else:
            self._connected = mux.loop.create_future()

    def _establish(self) -> None:
        lib.kmux_set_established(
            self.mux.c, self.sid, self.config.idle_ms, self.config.keepalive_ms
        )
        self.mux.want_flush()

    # -- receiving ---------------------------------------------------------
    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if not self._deliver_scheduled and not self._gone:
                self._deliver_scheduled = True
                self.mux.loop.call_soon(self._deliver)

    def set_receiver(self, receiver: StreamReceiver) -> None:
        super().set_receiver(receiver)
        if isinstance(receiver, BufferedReceiver):
            self._get_buffer, self._buffer_updated = receiver.get_buffer, receiver.buffer_updated
        else:
            self._get_buffer = self._buffer_updated = None

    def _deliver(self) -> None:
        """Hand every readable byte to the receiver (until it pauses), then check for EOF.

        A :class:`BufferedReceiver` (like the session's frame decoder) gets the bytes copied
        by C straight into its own buffer.
        """
        self._deliver_scheduled = False
        if self._gone or self._paused:
            return
        if self.on_first_data is not None:
            self._left_handshake()
        mux = self.mux
        mux.hint = self
        c, sid, receiver = mux.c, self.sid, self.receiver
        get_buffer, buffer_updated = self._get_buffer, self._buffer_updated
        if get_buffer is not None and buffer_updated is not None:
            avail = lib.kcp_readable(self._engine)
            while avail > 0 and not self._paused and not self._gone:
                # A cffi export left alive (a traceback keeps this frame) pins the
                # decoder's buffer, and once the cyclic GC clears the memoryview before the
                # export, CPython crashes (SIGSEGV in memory_dealloc): it ends right here.
                # (ffi.release, not ``with``: the cdata's context manager costs ~1 us a read.)
                target = ffi.from_buffer(get_buffer(avail), require_writable=True)
                try:
                    n = lib.kmux_read(c, sid, target, len(target))
                finally:
                    ffi.release(target)
                if n <= 0:
                    break
                avail -= n
                buffer_updated(n)
        else:
            n = READ_CHUNK
            while n == READ_CHUNK and not self._paused and not self._gone:
                n = lib.kmux_read(c, sid, mux.buffer_c, READ_CHUNK)
                if n <= 0:
                    break
                mux.deliver_copy(receiver, n)
        if self._peer_fin_sn is not None:
            self._check_eof()
        if not mux._in_poll and not self._gone and lib.kmux_has_dirty(c):
            mux.want_flush()  # our receive window reopened: tell the peer

    def _check_eof(self) -> None:
        if (
            self._gone
            or self._eof_delivered
            or self._peer_fin_sn is None
            or lib.kcp_rcv_nxt(self._engine) != self._peer_fin_sn
            or lib.kcp_readable(self._engine)
        ):
            return
        self._eof_delivered = True
        self.receiver.eof_received()
        if self._peer_full_close and not self._gone:
            if self._closed:
                self._maybe_finish_close()
            else:
                self._finish(ConnectionLost("kcp connection closed by peer"))

    # -- sending -----------------------------------------------------------
    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        if self._gone or self._closed or self._fin_sent:
            self._check_writable()
            raise ConnectionLost("kcp stream was half-closed with write_eof()")
        if len(buffers) != 1:
            buffers = _coalesce(buffers)
        mux = self.mux
        c, sid = mux.c, self.sid
        # outside event dispatch the last buffer is queued and flushed in one C call
        flush = not mux._busy
        last = len(buffers) - 1
        queued = nev = 0
        for i, buf in enumerate(buffers):
            data = buf if type(buf) is bytes else ffi.from_buffer(buf)
            try:
                if flush and i == last:
                    out = mux._out
                    queued = lib.kmux_write(c, sid, data, len(buf), 1, mux.events, EVENTS, out)
                    nev = out[0]
                else:
                    queued = lib.kmux_send(c, sid, data, len(buf))
            finally:
                if data is not buf:
                    ffi.release(data)  # the caller's buffer is exported only for the call
            if queued < 0:
                raise ConnectionLost("kcp session is dead")
        if not flush:
            mux.want_flush()
        elif nev:
            mux.handle_events(nev)
        if queued > self.high_water and not self.writing_paused and not self._gone:
            self._update_write_pressure()
            lib.kmux_notify_below(c, sid, self.low_water)

    @property
    def write_buffer_size(self) -> int:
        if self._gone:
            return 0
        return lib.kcp_pending_bytes(self._engine)

    def _on_writable(self) -> None:
        self._update_write_pressure()
        if self._closed:
            self._maybe_finish_close()

    def write_eof(self) -> None:
        self._check_writable()
        if not self._fin_sent:
            self._send_fin(full=False)

    def _send_fin(self, full: bool) -> None:
        self._fin_sent = True
        self._fin_full = self._fin_full or full
        self._fin_acked = False
        self._fin_sn = lib.kcp_final_sn(self._engine)
        self._fin_delay = FIN_RETRY
        self._fin_retry()

    def _fin_retry(self) -> None:
        self._fin_timer = None
        if self._gone or self._fin_acked:
            return
        self.mux.control(
            self.peer, self.conv, FIN, FULL_CLOSE if self._fin_full else 0, self._fin_sn
        )
        self._fin_timer = self.mux.loop.call_later(self._fin_delay, self._fin_retry)
        self._fin_delay = min(self._fin_delay * 2, FIN_RETRY_MAX)

    def _on_finack(self, full: bool) -> None:
        if full or not self._fin_full:
            self._fin_acked = True
            if self._fin_timer is not None:
                self._fin_timer.cancel()
                self._fin_timer = None
            self._maybe_finish_close()

    # -- control -----------------------------------------------------------
    def send_syn(self) -> None:
        """Dialling: (re)send SYN, echoing the listener's cookie once one came."""
        cookie = self._cookie
        self.mux.control(self.peer, self.conv, SYN, 0, cookie & 0xFFFFFFFF, MAGIC, cookie >> 32)

    def _on_cookie(self, ts: int, sn: int, una: int) -> None:
        if self._connected is not None and not self._connected.done() and una == MAGIC:
            self._cookie = (ts << 32) | sn
            self.send_syn()

    def _left_handshake(self) -> None:
        """The first bytes arrived (or the stream ended): no longer counted in the backlog."""
        callback, self.on_first_data = self.on_first_data, None
        if callback is not None:
            callback()

    def _on_synack(self, una: int) -> None:
        if self._connected is not None and not self._connected.done():
            if una != MAGIC:
                self._fail_connect(
                    ConnectFailed("the kcp peer answered with an unknown handshake version")
                )
                return
            self._establish()
            self._connected.set_result(None)

    def _on_fin(self, sn: int, full: bool) -> None:
        if self._peer_fin_sn is None:
            self._peer_fin_sn = sn
        self._peer_full_close = self._peer_full_close or full
        if self._eof_delivered:
            if full and not self._closed:
                self._finish(ConnectionLost("kcp connection closed by peer"))
            return
        if not self._paused:
            self._check_eof()

    def _fail_connect(self, exc: Exception) -> None:
        """Fail a pending dial (dial() reads the error; nobody else must have to)."""
        connected = self._connected
        if connected is not None and not connected.done():
            connected.set_exception(exc)
            connected.exception()

    def _on_rst(self, busy: bool = False) -> None:
        if self._connected is not None and not self._connected.done():
            if busy:
                reason = "the kcp server is busy (too many connections in the handshake)"
            else:
                reason = "the kcp peer refused the connection (nothing listens there)"
            self._fail_connect(ConnectFailed(reason))
            return
        if self._closed and self._fin_acked and self._fin_full:
            self._finish(None)  # the peer already had everything and forgot us
        else:
            self._finish(ConnectionLost("kcp connection reset by peer"))

    def _on_dead(self, reason: int) -> None:
        if reason == DEAD_LINK:
            message = "kcp peer unreachable: a segment was retransmitted too often (dead link)"
        elif reason == DEAD_UNREACHABLE:
            message = "kcp peer gone: ICMP port unreachable (its process has ended)"
        else:
            message = f"kcp peer silent for {self.config.timeout:g}s (idle timeout)"
        self._fail_connect(ConnectFailed(message))
        self._finish(ConnectionLost(message))

    def _on_socket_error(self, err: int) -> None:
        if err == errno.ECONNREFUSED:
            message = "connection refused (is a kcp server listening there?)"
        else:
            message = os.strerror(err)
        if self._connected is not None and not self._connected.done():
            self._fail_connect(ConnectFailed(message))
            return
        self._finish(ConnectionLost(f"kcp socket error: {message}"))

    # -- closing -----------------------------------------------------------
    def _maybe_finish_close(self) -> None:
        """A graceful close is complete once the peer acknowledged all data and our FIN."""
        if self._gone or not self._closed:
            return
        if self._fin_acked and lib.kcp_pending_bytes(self._engine) == 0:
            self._finish(None)

    async def close(self) -> None:
        if self._gone:
            return
        if not self._closed:
            self._closed = True
            self._send_fin(full=True)
            lib.kmux_notify_below(self.mux.c, self.sid, 0)
            self.mux.want_flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._done), CLOSE_TIMEOUT)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self._gone:
            return
        self._closed = True
        self.mux.control(self.peer, self.conv, RST)
        self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        """Free the session (C state included) and report the end exactly once."""
        if self._gone:
            return
        self._gone = True
        self._left_handshake()
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None
        self._engine = ffi.NULL
        self.mux.release(self.sid)
        self._fail_connect(exc or ConnectFailed("kcp connection closed"))
        if not self._done.done():
            self._done.set_result(None)
        self._connection_lost(exc)

    # -- info --------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """KCP counters of this session (rto, srtt, cwnd, retransmissions, drops...)."""
        if self._gone:
            return {}
        st = ffi.new("kcp_stats *")
        lib.kcp_get_stats(self._engine, st)
        return {name: getattr(st, name) for name in STAT_FIELDS}
