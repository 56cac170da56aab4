"""The polyrpc frame format and an incremental decoder fed bytes, with no I/O of its own.

Sans-IO: the session's receiving end (routing decoded frames to reply futures and handlers)
is polyrpc.session.routing's subclass of this decoder.

Layout (little-endian; see docs/protocol.md)::

    0  2  magic  b"PR"
    2  1  version (1)
    3  1  kind (Kind)
    4  1  codec id
    5  1  flags
    6  2  method length  (u16)
    8  8  sequence id    (u64)
    16 4  metadata length (u32)
    20 4  payload length (u32)
    24    method (UTF-8) | metadata | payload

Metadata is a string map: per entry u16 key length, key, u32 value length,
value (both UTF-8). Every length is checked against the limits before any
buffer is allocated for it.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from ..errors import ProtocolError

MAGIC = b"PR"
VERSION = 1
HEADER = struct.Struct("<2sBBBBHQII")
HEADER_SIZE = HEADER.size
_pack = HEADER.pack
_META_KEY = struct.Struct("<H")
_META_VALUE = struct.Struct("<I")
_EMPTY: dict[str, str] = {}
_method_bytes: dict[str, bytes] = {}

LARGE_PAYLOAD = 128 << 10
"""Payloads at least this big are read straight into their own buffer (no copy)."""
INITIAL_BUFFER = 4 << 10
"""The small-frame buffer's size at first and after :meth:`FrameDecoder.trim`."""
MAX_BUFFER = 256 << 10
"""The small-frame buffer doubles while reads fill it, up to this size."""
LARGE_STEP = 256 << 10
"""A big payload's buffer starts at this size (or twice what arrived) and doubles as it
fills: what is allocated ahead of the bytes received stays below max(this, received)."""


class Kind(IntEnum):
    """What a frame is for."""

    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    ERROR = 4
    ONEWAY = 5
    HEARTBEAT = 6
    CANCEL = 7
    STREAM_ITEM = 8
    STREAM_END = 9
    CREDIT = 10
    GOAWAY = 11


_KINDS = frozenset(int(k) for k in Kind)
_HELLO = int(Kind.HELLO)

FLAG_REPLY = 0x01
"""HELLO/HEARTBEAT: this frame answers the peer's."""
FLAG_STREAM = 0x02
"""REQUEST: the caller expects a stream of items; RESPONSE: items follow."""
FLAG_ARG_STREAM = 0x04
"""REQUEST: the last argument arrives as STREAM_ITEM frames after the request."""
FLAG_COMPRESSED = 0x08
"""Any kind: the payload is compressed with the compression negotiated in HELLO
(polyrpc.wire.compression); only sent to a peer that accepted compression."""


MIN_PEER_MAX_FRAME = 4096
"""The smallest ``max_frame`` a side may announce in HELLO: room for any error reply."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced on every received frame, before allocation."""

    max_frame: int = 64 << 20
    max_metadata: int = 64 << 10
    max_method: int = 1024
    max_handshake_frame: int = 16 << 10
    """The largest frame accepted before the handshake completes (HELLO fits easily)."""

    def __post_init__(self) -> None:
        if (
            self.max_frame < HEADER_SIZE
            or self.max_handshake_frame < HEADER_SIZE
            or self.max_metadata < 0
            or self.max_method < 0
        ):
            raise ValueError(f"invalid frame limits: {self}")


class Frame:
    """One decoded frame; ``payload`` is still encoded (see ``codec``)."""

    __slots__ = ("codec", "flags", "kind", "metadata", "method", "payload", "seq")

    def __init__(
        self,
        kind: int,
        seq: int,
        method: str = "",
        metadata: dict[str, str] = _EMPTY,
        payload: Any = b"",
        codec: int = 0,
        flags: int = 0,
    ) -> None:
        self.kind = kind
        self.seq = seq
        self.method = method
        self.metadata = metadata
        self.payload = payload
        self.codec = codec
        self.flags = flags

    def __repr__(self) -> str:
        return _frame_repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _PyFrame):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


_PyFrame = Frame
"""The pure-Python Frame, whichever ``Frame`` the module ends up exporting."""


def _frame_repr(frame: Any) -> str:
    """The repr of a Frame (shared by the Python and the C Frame)."""
    name = Kind(frame.kind).name if frame.kind in _KINDS else frame.kind
    return (
        f"Frame({name}, seq={frame.seq}, method={frame.method!r}, "
        f"metadata={frame.metadata!r}, payload={len(frame.payload)} bytes, "
        f"codec={frame.codec}, flags={frame.flags:#x})"
    )


def encode_metadata(metadata: dict[str, str]) -> bytes:
    """Serialise a string map in the frame's metadata layout."""
    parts: list[bytes] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
        k, v = key.encode(), value.encode()
        parts += (_META_KEY.pack(len(k)), k, _META_VALUE.pack(len(v)), v)
    return b"".join(parts)


def decode_metadata(data: bytes | memoryview) -> dict[str, str]:
    """Parse metadata bytes; ProtocolError on any inconsistency."""
    result: dict[str, str] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            (klen,) = _META_KEY.unpack_from(data, pos)
            pos += 2
            key = bytes(data[pos : pos + klen]).decode()
            pos += klen
            (vlen,) = _META_VALUE.unpack_from(data, pos)
            pos += 4
            if pos + vlen > end:
                raise ProtocolError("metadata entry runs past the metadata block")
            result[key] = bytes(data[pos : pos + vlen]).decode()
            pos += vlen
        if pos != end:
            raise ProtocolError("metadata entry runs past the metadata block")
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed frame metadata: {exc}") from None
    return result


def encode_frame(
    kind: int,
    seq: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    method: str = "",
    metadata: dict[str, str] | None = None,
    codec: int = 0,
    flags: int = 0,
) -> list[bytes | bytearray | memoryview]:
    """The frame as buffers for a gather write: a prefix, and a large payload separately."""
    if not method and not metadata:
        return _py_encode_plain(kind, seq, payload, codec, flags)
    method_bytes = _method_bytes.get(method)
    if method_bytes is None:
        method_bytes = method.encode()
        if len(_method_bytes) < 4096:
            _method_bytes[method] = method_bytes
    meta = encode_metadata(metadata) if metadata else b""
    header = HEADER.pack(
        MAGIC, VERSION, kind, codec, flags, len(method_bytes), seq, len(meta), len(payload)
    )
    if len(payload) >= LARGE_PAYLOAD:
        return [header + method_bytes + meta, payload]
    return [b"".join((header, method_bytes, meta, payload))]


def encode_plain(
    kind: int, seq: int, payload: bytes | bytearray | memoryview, codec: int = 0, flags: int = 0
) -> list[bytes | bytearray | memoryview]:
    """:func:`encode_frame` for the common frame with no method and no metadata (hot path)."""
    header = _pack(MAGIC, VERSION, kind, codec, flags, 0, seq, 0, len(payload))
    if len(payload) >= LARGE_PAYLOAD:
        return [header, payload]
    return [header + payload if type(payload) is bytes else b"".join((header, payload))]


_py_encode_frame = encode_frame
_py_encode_plain = encode_plain


def describe_garbage(data: bytes) -> str:
    """A hint about what a non-polyrpc peer might be, from its first bytes."""
    head = bytes(data[:8])
    if head[:4] in (b"GET ", b"POST", b"PUT ", b"HEAD", b"PRI ", b"OPTI", b"DELE", b"HTTP"):
        return f"the peer is speaking HTTP, not polyrpc (got {head!r})"
    if head[:1] == b"\x16":
        return f"the peer is speaking TLS; use the tls@ scheme (got {head!r})"
    return f"the peer is not speaking polyrpc (bad magic {head[:2]!r}, expected {MAGIC!r})"


class FrameDecoder:
    """Incremental frame parser. Feed bytes (or let a socket fill :meth:`get_buffer`).

    Both entry points return the frames completed so far; a violation raises
    ProtocolError and leaves the decoder broken (the connection must close).

    With ``handshake=True`` the decoder starts in handshake mode: no frame larger than
    ``limits.max_handshake_frame`` (or max_frame if smaller) is accepted, the small-frame buffer does not grow for
    reads, and decoding stops after a HELLO: the bytes after it are kept until
    :meth:`set_max_frame` ends the mode (then ``buffer_updated(0)`` decodes them).
    """

    def __init__(self, limits: Limits | None = None, *, handshake: bool = False) -> None:
        self._limits = limits or Limits()
        self._handshaking = bool(handshake)
        self._after_hello = False
        """Handshake mode saw a HELLO: later bytes are kept, not parsed, until set_max_frame."""
        self._max_frame: int = self._limits.max_frame
        if handshake:
            self._max_frame = min(self._limits.max_handshake_frame, self._max_frame)
        self._buf = bytearray(INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._offered = 0
        self._grow = False
        self._want = 0
        """Bytes of a pending frame to hold from ``_start`` (get_buffer makes the room)."""
        self._large: bytearray | None = None
        self._large_filled = 0
        self._large_size = 0
        self._large_frame: Frame | None = None
        self._methods: dict[bytes, str] = {}
        self.broken: ProtocolError | None = None
        self.bytes_received = 0
        """Bytes given to this decoder so far (read into get_buffer() or fed)."""

    @property
    def limits(self) -> Limits:
        """The Limits checked against every header."""
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._limits = limits
        if not self._handshaking:
            self._max_frame = limits.max_frame

    @property
    def max_frame(self) -> int:
        """The largest frame accepted now (the handshake limit until :meth:`set_max_frame`)."""
        return self._max_frame

    def set_max_frame(self, limit: int) -> None:
        """End handshake mode: accept frames of up to ``limit`` bytes from now on."""
        limit = operator.index(limit)
        if not HEADER_SIZE <= limit < 1 << 63:
            raise ValueError(f"max_frame must be at least {HEADER_SIZE} bytes, got {limit}")
        self._max_frame = limit
        self._handshaking = self._after_hello = False

    def trim(self) -> None:
        """Give back a grown small-frame buffer while no frame is pending (call when idle)."""
        if self._large is None and self._start == self._end and len(self._buf) > INITIAL_BUFFER:
            self._buf = bytearray(INITIAL_BUFFER)
            self._start = self._end = 0
        self._grow = False

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF means a truncated frame)."""
        if self._large is not None:
            return HEADER_SIZE + self._large_filled
        return self._end - self._start

    # -- socket-facing, copy-free path ------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable space for the next read (the large payload's own buffer when in one)."""
        large = self._large
        if large is not None:
            if self._large_filled == len(large):  # full: double it
                large = self._grow_large(large)
            return memoryview(large)[self._large_filled :]
        if self._grow:  # the last read filled what was offered: read more at a time
            self._grow = False
            if len(self._buf) < MAX_BUFFER:
                self._make_room(min(MAX_BUFFER, 2 * len(self._buf)) - self._end + self._start)
        needed = max(4096, self._want - (self._end - self._start))
        free = len(self._buf) - self._end
        if free < needed:
            self._make_room(needed)
            free = len(self._buf) - self._end
        self._offered = free
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into the last :meth:`get_buffer`; return complete frames."""
        self.bytes_received += nbytes
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled < self._large_size:
                return []
            frame = self._large_frame
            assert frame is not None
            frame.payload = bytes(self._large)  # payloads are bytes (the C decoder fills one)
            self._large = self._large_frame = None
            return [frame]
        if nbytes and nbytes == self._offered and not self._handshaking:
            self._grow = True
        self._end += nbytes
        return self._parse()

    def _grow_large(self, large: bytearray) -> bytearray:
        """Double a full big-payload buffer (up to the payload's size), in place unless a
        view of it is still alive (then into a new buffer)."""
        want = min(self._large_size, 2 * len(large))
        try:
            large.extend(bytes(want - len(large)))
        except BufferError:
            grown = bytearray(want)
            grown[: len(large)] = large
            self._large = large = grown
        return large

    # -- plain path --------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return the frames they complete."""
        frames: list[Frame] = []
        view = memoryview(data)
        if view and self.broken is not None:
            raise self.broken
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            target.release()  # the next get_buffer may resize the buffer
            view = view[n:]
            frames += self.buffer_updated(n)
        return frames

    # -- internals ---------------------------------------------------------
    def _make_room(self, needed: int) -> None:
        """Ensure ``needed`` free bytes after ``_end``: compact first, grow if still short
        (into a new buffer if a caller still holds a view of this one)."""
        used = self._end - self._start
        if self._start:
            self._buf[:used] = self._buf[self._start : self._end]
            self._start, self._end = 0, used
        if len(self._buf) - used < needed:
            try:
                self._buf.extend(bytes(needed - (len(self._buf) - used)))
            except BufferError:  # a view from an earlier get_buffer is alive: move
                grown = bytearray(used + needed)
                grown[:used] = self._buf[:used]
                self._buf = grown

    def _fail(self, message: str) -> ProtocolError:
        self.broken = ProtocolError(message)
        return self.broken

    def _parse(self) -> list[Frame]:
        if self.broken is not None:
            raise self.broken
        frames: list[Frame] = []
        if self._after_hello:
            return frames
        buf = self._buf
        limits = self._limits
        max_frame = self._max_frame
        while True:
            start, avail = self._start, self._end - self._start
            if avail < HEADER_SIZE:
                if avail >= 2 and buf[start : start + 2] != MAGIC:
                    raise self._fail(describe_garbage(bytes(buf[start : self._end])))
                self._want = 0
                break
            magic, version, kind, codec, flags, mlen, seq, metalen, plen = HEADER.unpack_from(
                buf, start
            )
            if magic != MAGIC:
                raise self._fail(describe_garbage(bytes(buf[start : start + HEADER_SIZE])))
            if version != VERSION:
                raise self._fail(f"unsupported polyrpc frame version {version} (this is {VERSION})")
            if kind not in _KINDS:
                raise self._fail(f"unknown frame kind {kind}")
            if mlen > limits.max_method:
                raise self._fail(f"method name of {mlen} bytes exceeds {limits.max_method}")
            if metalen > limits.max_metadata:
                raise self._fail(f"metadata of {metalen} bytes exceeds {limits.max_metadata}")
            total = HEADER_SIZE + mlen + metalen + plen
            if total > max_frame:
                when = " before the handshake" if self._handshaking else ""
                raise self._fail(f"frame of {total} bytes exceeds the limit of {max_frame}{when}")
            prefix = HEADER_SIZE + mlen + metalen
            if avail < total:
                if plen >= LARGE_PAYLOAD and avail >= prefix:
                    self._begin_large(kind, seq, codec, flags, mlen, metalen, plen)
                    break
                # a big payload gets its own buffer: only its prefix is staged here; the next
                # get_buffer makes room (resizing fails while the caller holds its last view)
                self._want = prefix if plen >= LARGE_PAYLOAD else total
                break
            if mlen or metalen:
                frame = self._build(kind, seq, codec, flags, mlen, metalen)
                frame.payload = bytes(buf[start + prefix : start + total])
            else:
                frame = _PyFrame(
                    kind, seq, "", _EMPTY, bytes(buf[start + prefix : start + total]), codec, flags
                )
            frames.append(frame)
            self._start = start + total
            if kind == _HELLO and self._handshaking:
                self._after_hello = True  # what follows waits for the limit set after it
                self._want = 0
                break
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _build(self, kind: int, seq: int, codec: int, flags: int, mlen: int, metalen: int) -> Frame:
        buf, pos = self._buf, self._start + HEADER_SIZE
        method = ""
        if mlen:
            raw = bytes(buf[pos : pos + mlen])
            method = self._methods.get(raw)  # type: ignore[assignment]
            if method is None:
                try:
                    method = raw.decode()
                except UnicodeDecodeError:
                    raise self._fail("method name is not valid UTF-8") from None
                if len(self._methods) < 4096:
                    self._methods[raw] = method
        metadata = _EMPTY
        if metalen:
            try:
                metadata = decode_metadata(memoryview(buf)[pos + mlen : pos + mlen + metalen])
            except ProtocolError as exc:
                raise self._fail(str(exc)) from None
        return _PyFrame(kind, seq, method, metadata, b"", codec, flags)

    def _begin_large(
        self, kind: int, seq: int, codec: int, flags: int, mlen: int, metalen: int, plen: int
    ) -> None:
        """Switch to reading a big payload into its own buffer, keeping what already arrived.
        The buffer grows as the payload arrives (see LARGE_STEP), never from the header alone."""
        frame = self._build(kind, seq, codec, flags, mlen, metalen)
        begin = self._start + HEADER_SIZE + mlen + metalen
        have = self._end - begin
        large = bytearray(min(plen, max(LARGE_STEP, 2 * have)))
        large[:have] = self._buf[begin : self._end]
        self._start = self._end = self._want = 0
        self._grow = False
        self._large, self._large_filled, self._large_frame = large, have, frame
        self._large_size = plen


PyFrameDecoder = FrameDecoder
"""The pure-Python decoder, whichever one this module exports as FrameDecoder (the session's
routing decoder reference extends it)."""


class Implementation(NamedTuple):
    """One complete frame codec: the pure-Python reference or the C accelerator."""

    name: str
    Frame: type
    FrameDecoder: type
    encode_frame: Callable[..., list[bytes | bytearray | memoryview]]
    encode_plain: Callable[..., list[bytes | bytearray | memoryview]]


PYTHON = Implementation("python", Frame, FrameDecoder, encode_frame, encode_plain)
"""The pure-Python codec: the reference, and the fallback when the C one is missing."""
ACCELERATED: Implementation | None = None
"""The C codec (polyrpc.wire._frames) when it is built, whether or not it is in use."""

try:
    from . import _frames
except ImportError:
    pass
else:
    ACCELERATED = Implementation(
        "c", _frames.Frame, _frames.FrameDecoder, _frames.encode_frame, _frames.encode_plain
    )

IMPLEMENTATION = PYTHON
"""The codec this module exports; POLYRPC_PURE_PYTHON=1 forces the pure-Python one."""
if ACCELERATED is not None and os.environ.get("POLYRPC_PURE_PYTHON", "") in ("", "0"):
    IMPLEMENTATION = ACCELERATED
    Frame, FrameDecoder, encode_frame, encode_plain = ACCELERATED[1:]  # type: ignore[misc, assignment]
