"""Python face of the C KCP engine (sans-IO): used by tests, interop checks and tools.

The transport itself drives the C multiplexer (:mod:`.udp`); this wrapper exposes
one engine with explicit time so that tests can run it without sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    from ._kcp import ffi, lib
except ImportError as exc:  # the C extension was not built
    ffi = lib = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

HEADER_SIZE = 24
CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS = 81, 82, 83, 84

STAT_FIELDS = (
    "in_datagrams",
    "in_segments",
    "in_bytes",
    "out_datagrams",
    "out_segments",
    "retransmits",
    "fast_retransmits",
    "duplicates",
    "dropped_malformed",
    "window_probes",
    "srtt",
    "rttvar",
    "rto",
    "cwnd",
    "rmt_wnd",
    "snd_wnd",
    "rcv_wnd",
    "snd_queue",
    "snd_buf",
    "rcv_queue",
    "rcv_buf",
)


def unavailable_reason() -> str | None:
    """None if the C core is importable, else why not and how to fix it."""
    if _IMPORT_ERROR is None:
        return None
    return (
        f"the KCP C extension polyrpc.transports.kcp._kcp is not built ({_IMPORT_ERROR}); "
        "reinstall polyrpc with a C compiler available (pip install --force-reinstall polyrpc), "
        "or in a checkout run: python setup.py build_ext --inplace"
    )


def now_ms() -> int:
    """The C core's clock: monotonic milliseconds, wrapping at 2**32."""
    return lib.kcp_now_ms()


def live_segments() -> int:
    """Segments allocated by every engine in this process (proves that close frees memory)."""
    return lib.kcp_live_segments()


class KcpEngine:
    """One KCP conversation without a socket: feed datagrams in, take datagrams out."""

    def __init__(
        self,
        conv: int,
        *,
        mtu: int = 1400,
        sndwnd: int = 32,
        rcvwnd: int = 128,
        nodelay: int = 0,
        interval: int = 100,
        resend: int = 0,
        nocwnd: int = 0,
        stream: bool = False,
        dead_link: int = 20,
    ) -> None:
        if lib is None:
            raise RuntimeError(unavailable_reason())
        raw = lib.kcp_new(conv)
        if raw == ffi.NULL:
            raise MemoryError("kcp_new failed")
        self._k = ffi.gc(raw, lib.kcp_free)
        if lib.kcp_set_mtu(self._k, mtu) < 0:
            raise ValueError(f"bad mtu {mtu}")
        lib.kcp_set_stream(self._k, int(stream))
        lib.kcp_set_wndsize(self._k, sndwnd, rcvwnd)
        lib.kcp_set_nodelay(self._k, nodelay, interval, resend, nocwnd)
        lib.kcp_set_dead_link(self._k, dead_link)
        self.stream = stream
        self._recv_buf = bytearray(256 << 10)
        self._lens = ffi.new("uint32_t[]", 1024)

    def send(self, data: bytes) -> None:
        """Queue ``data`` (a message in message mode, bytes of the stream in stream mode)."""
        rc = lib.kcp_send(self._k, ffi.from_buffer(data), len(data))
        if rc == -2:
            raise ValueError(f"message of {len(data)} bytes needs more than 255 fragments")
        if rc < 0:
            raise MemoryError("kcp_send failed")

    def recv(self) -> bytes | None:
        """Stream mode: all readable bytes; message mode: the next whole message; None if none."""
        while True:
            n = lib.kcp_recv(self._k, ffi.from_buffer(self._recv_buf), len(self._recv_buf))
            if n == -3:
                self._recv_buf = bytearray(max(lib.kcp_peeksize(self._k), 2 * len(self._recv_buf)))
                continue
            if n < 0 or (n == 0 and self.stream):
                return None
            data = bytes(self._recv_buf[:n])
            if self.stream:
                more = self.recv()
                if more:
                    data += more
            return data

    def input(self, datagram: bytes, now: int) -> int:
        """Feed one datagram; 0 if accepted, negative if malformed (counted, never raised)."""
        return lib.kcp_input(self._k, ffi.from_buffer(datagram), len(datagram), now)

    def input_many(self, datagrams: Iterable[bytes], now: int) -> int:
        """Feed a batch of datagrams in one C call; returns how many were well-formed."""
        batch = list(datagrams)
        if not batch:
            return 0
        lens = ffi.new("uint32_t[]", [len(d) for d in batch])
        joined = b"".join(batch)
        return lib.kcp_input_batch(self._k, ffi.from_buffer(joined), lens, len(batch), now)

    def flush(self, now: int) -> None:
        """Send acks, window probes, new data the window allows, and due retransmissions."""
        lib.kcp_flush(self._k, now)

    def check(self, now: int) -> int | None:
        """Absolute time (ms) at which :meth:`flush` must run next; None if nothing is pending."""
        has = ffi.new("int *")
        t = lib.kcp_check(self._k, now, has)
        return t if has[0] else None

    def take_output(self) -> list[bytes]:
        """The datagrams produced since the last call, in order."""
        out: list[bytes] = []
        while lib.kcp_output_size(self._k):
            size = max(lib.kcp_output_size(self._k), 65536)
            buf = bytearray(size)
            n = lib.kcp_take_output(self._k, ffi.from_buffer(buf), size, self._lens, 1024)
            pos = 0
            for i in range(n):
                out.append(bytes(buf[pos : pos + self._lens[i]]))
                pos += self._lens[i]
        return out

    @property
    def conv(self) -> int:
        """The conversation id."""
        return lib.kcp_conv(self._k)

    @property
    def dead(self) -> bool:
        """True once a segment was sent ``dead_link`` times without an ack."""
        return bool(lib.kcp_dead(self._k))

    @property
    def waitsnd(self) -> int:
        """Segments queued or in flight."""
        return lib.kcp_waitsnd(self._k)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued or in flight (not yet acknowledged)."""
        return lib.kcp_pending_bytes(self._k)

    @property
    def readable(self) -> int:
        """Bytes (stream) or whether a message (message mode) can be read now."""
        return lib.kcp_readable(self._k)

    def stats(self) -> dict[str, Any]:
        """Counters and congestion state (rto, srtt, cwnd, windows, queue lengths)."""
        st = ffi.new("kcp_stats *")
        lib.kcp_get_stats(self._k, st)
        return {name: getattr(st, name) for name in STAT_FIELDS}
