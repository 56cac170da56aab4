"""Sans-IO core of the rdma stream: connection data, credits, send and receive slots.

Everything a peer can influence once connected passes through here: the private data
of its connection request or answer (:class:`PeerInfo`), and for every message it
sends, the immediate data (message kind + credits returned) and the byte count. The
core turns receive completions into deliveries and reposts, and queued bytes into
sends, through a small device interface (:class:`Device`: post a receive, post a
batch of sends) over two plain buffers. No verbs here, so the host test suite drives
it with arbitrary and hostile completions (tests/test_rdma_engine.py); the stream
(stream.py) feeds it the completions polled from the CQ and implements :class:`Device`
with pyverbs. A peer that breaks the protocol gets a :class:`ProtocolError`, never
unbounded state.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ...errors import ProtocolError
from ...stream.trait import Buffer

DATA, EOF, CLOSE, CREDIT, GROW = 0, 1, 2, 3, 4
KIND_SHIFT = 24
CREDIT_MASK = (1 << KIND_SHIFT) - 1
NO_SLOT = -1
"""Send-queue entry of a message without payload (EOF, CLOSE, credit update)."""
MIN_DEPTH, MAX_DEPTH = 4, 4096
MIN_BUFSIZE, MAX_BUFSIZE = 4096, 16 << 20
HS_DEPTH, HS_BUFSIZE = MIN_DEPTH, MIN_BUFSIZE
"""The handshake rings: 4 x 4 KiB each way (32 KiB registered) carry the HELLO (at most
16 KiB) before the full rings are registered."""

HELLO = struct.Struct("!4sBBHIII16s")
"""Connection private data: magic, version, path MTU enum, depth, bufsize, QPN, PSN, GID."""
MAGIC = b"PRDM"
VERSION = 2


@dataclass
class PeerInfo:
    """What each side tells the other in the rdma_cm private data."""

    mtu: int
    depth: int
    bufsize: int
    qpn: int
    psn: int
    gid: bytes

    def pack(self) -> bytes:
        return HELLO.pack(
            MAGIC, VERSION, self.mtu, self.depth, self.bufsize, self.qpn, self.psn, self.gid
        )

    @classmethod
    def unpack(cls, data: bytes) -> PeerInfo:
        """Parse and check a peer's connection data (ValueError saying what is wrong)."""
        if len(data) < HELLO.size:
            raise ValueError(f"{len(data)} bytes of connection data, expected {HELLO.size}")
        magic, version, mtu, depth, bufsize, qpn, psn, gid = HELLO.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("the peer is not a polyrpc rdma endpoint (bad connection data)")
        if version != VERSION:
            raise ValueError(f"the peer speaks polyrpc rdma version {version}, not {VERSION}")
        if not MIN_DEPTH <= depth <= MAX_DEPTH:
            raise ValueError(f"the peer announced depth {depth}, not {MIN_DEPTH}-{MAX_DEPTH}")
        if not MIN_BUFSIZE <= bufsize <= MAX_BUFSIZE or bufsize & (bufsize - 1):
            raise ValueError(
                f"the peer announced bufsize {bufsize}, not a power of two "
                f"{MIN_BUFSIZE}-{MAX_BUFSIZE}"
            )
        return cls(mtu, depth, bufsize, qpn, psn, gid)


Send = tuple[int, int, int, bool, int]
"""One SEND-with-immediate: (wr_id, send slot or NO_SLOT, length, signaled, immediate)."""


class Device(Protocol):
    """What the core asks of the queue pair and its registered memory."""

    def post_recv(self, slot: int) -> None:
        """Post receive buffer ``slot`` (again)."""

    def post_sends(self, batch: list[Send]) -> None:
        """Post these sends, in order, as one chain."""

    def grow(self) -> tuple[memoryview, memoryview]:
        """Register the full receive and send rings (slots from HS_DEPTH on); their views."""


class RdmaEngine:
    """Credits, slots and message kinds of one connection, over plain buffers.

    A connection starts with handshake rings of HS_DEPTH x HS_BUFSIZE bytes each way
    (slots 0 to HS_DEPTH - 1); :meth:`grow` adds the full rings of ``depth`` x
    ``bufsize`` (slots HS_DEPTH on) once the polyrpc handshake is done, retires the
    handshake rings and tells the peer with a GROW message.
    """

    def __init__(
        self,
        device: Device,
        recv_buf: memoryview,
        send_buf: memoryview,
        depth: int,
        bufsize: int,
        max_send: int,
        peer_depth: int,
        peer_bufsize: int,
        on_data: Callable[[memoryview], object],
        on_eof: Callable[[], None],
    ) -> None:
        self._device = device
        self._recv_small = recv_buf
        self._send_small = send_buf
        self._recv_big = self._send_big = memoryview(b"")
        self.depth = depth
        self.bufsize = bufsize
        self.max_send = max_send
        self._peer_depth = peer_depth
        self._peer_bufsize = peer_bufsize
        self._on_data = on_data
        self._on_eof = on_eof
        self.stopped = False
        """Set once the connection is gone: nothing is posted any more."""
        self.grown = False
        """This side's full rings are registered and posted."""
        self._grow_due = False  # GROW waits for a credit
        # the ring this side sends from: its first slot, slot count, slot size and buffer
        self._ring_start, self._ring_depth, self._ring_size = 0, HS_DEPTH, HS_BUFSIZE
        self._send = send_buf
        # flow control
        self.credits = HS_DEPTH
        self._peer_limit = HS_DEPTH  # more credits than this the peer can never return
        # Messages that still land in the peer's handshake buffers after its GROW (-1:
        # no GROW yet); until they are used up, messages are at most HS_BUFSIZE bytes.
        self._peer_small_left = -1
        self._target = HS_BUFSIZE
        self._owed = 0
        self._granted = HS_DEPTH  # receive buffers the peer was told about
        self.received = 0
        self._credit_threshold = 1
        # sending
        self._queue: collections.deque[memoryview | int] = collections.deque()
        self.queued = 0
        # Send slots are taken and freed in order (an RC completion retires every earlier
        # send), so the free ones always run on consecutively, wrapping at the ring's end.
        self._free_slots = collections.deque(range(HS_DEPTH))
        # Posted sends in order: (sequence number = wr_id, slot). Only every
        # ``_signal_every``-th send asks for a completion; on RC a completion also
        # retires every earlier send, which frees their slots (fewer wake-ups).
        self._sq: collections.deque[tuple[int, int]] = collections.deque()
        self._seq = 0
        self._since_signal = 0
        self._signal_every = 1
        self.close_seq = -1
        self._batch: list[Send] = []
        self.eof_queued = False
        # receiving
        self.paused = False
        self._pending: collections.deque[tuple[int, int, int]] = collections.deque()
        # Full DATA messages in consecutive receive slots of one ring are contiguous
        # bytes: they are delivered as one run (slot, bytes, messages): one copy.
        self._run_slot = 0
        self._run_len = 0
        self._run_count = 0
        self._eof_seen = False
        self._peer_grown = False
        self.peer_closed = False
        self.eof_delivered = False

    @property
    def registered_bytes(self) -> int:
        """Bytes of receive and send buffers this connection has registered."""
        small = 2 * HS_DEPTH * HS_BUFSIZE
        return small + 2 * self.depth * self.bufsize if self.grown else small

    def _recv_at(self, slot: int) -> tuple[memoryview, int]:
        """The receive buffer holding ``slot`` and the slot's offset in it."""
        if slot < HS_DEPTH:
            return self._recv_small, slot * HS_BUFSIZE
        return self._recv_big, (slot - HS_DEPTH) * self.bufsize

    # -- growing -------------------------------------------------------------
    def grow(self) -> None:
        """The handshake is done: post the full receive ring, send from the full send
        ring, stop reposting the handshake buffers and send GROW (when a credit allows)."""
        if self.grown or self.stopped:
            return
        self._recv_big, self._send_big = self._device.grow()
        self.grown = True
        depth = self.depth
        self._ring_start, self._ring_depth, self._ring_size = HS_DEPTH, depth, self.bufsize
        self._send = self._send_big
        self._free_slots = collections.deque(range(HS_DEPTH, HS_DEPTH + depth))
        self._signal_every = max(1, min(depth, self.max_send) // 4)
        self._credit_threshold = max(1, depth // 4)
        for slot in range(HS_DEPTH, HS_DEPTH + depth):
            self._device.post_recv(slot)
        self._granted += depth
        self._grow_due = True
        self.pump()

    def _on_peer_grow(self) -> None:
        """The peer posted its full ring behind the handshake buffers we hold credits for."""
        self._peer_grown = True
        self._peer_small_left = self.credits
        if not self.credits:
            self._target = self._peer_bufsize
        self.credits += self._peer_depth
        self._peer_limit = self.credits

    # -- receiving -----------------------------------------------------------
    def on_recv(self, slot: int, length: int, imm: int) -> None:
        """A receive completed in ``slot`` with ``length`` bytes and immediate ``imm``."""
        kind = imm >> KIND_SHIFT
        returned = imm & CREDIT_MASK
        self._check_recv(slot, length, kind, returned)
        self.received += 1
        self.credits += returned
        if kind in (CREDIT, GROW):
            if kind == GROW:
                self._on_peer_grow()
            self._repost(slot)
            return
        if kind == EOF:
            self._eof_seen = True
        elif kind == CLOSE:
            self.peer_closed = True
        count = self._run_count
        if count:
            start = self._run_slot
            if (
                kind == DATA
                and slot == start + count
                and (slot < HS_DEPTH) == (start < HS_DEPTH)
                and self._run_len == count * (HS_BUFSIZE if start < HS_DEPTH else self.bufsize)
            ):
                self._run_len += length
                self._run_count = count + 1
                return
            self.deliver_run()
        if self.paused or self._pending:
            self._pending.append((kind, slot, length))
        elif kind == DATA:
            self._run_slot = slot
            self._run_len = length
            self._run_count = 1
        else:
            self._deliver(kind, slot, length)

    def _check_recv(self, slot: int, length: int, kind: int, returned: int) -> None:
        """Refuse what a correct peer never sends (before any state changes)."""
        slots = HS_DEPTH + self.depth if self.grown else HS_DEPTH
        if not 0 <= slot < slots:
            raise ProtocolError(f"receive completion for slot {slot} of {slots}")
        size = HS_BUFSIZE if slot < HS_DEPTH else self.bufsize
        if not 0 <= length <= size:
            raise ProtocolError(f"{length}-byte message for a {size}-byte buffer")
        if kind > GROW:
            raise ProtocolError(f"unknown message kind {kind}")
        if self.peer_closed:
            raise ProtocolError("message after the peer's CLOSE")
        if self._eof_seen and kind in (DATA, EOF):
            raise ProtocolError("data after the peer's EOF")
        if kind != DATA and length:
            raise ProtocolError(f"{length} bytes of payload in a control message")
        if kind == GROW and self._peer_grown:
            raise ProtocolError("GROW received twice")
        if self.received >= self._granted:
            raise ProtocolError("the peer sent a message without a credit")
        # our sends the peer has not seen yet hold credits too: all of them together
        # can never exceed the peer's buffers
        if self.credits + returned > self._peer_limit:
            raise ProtocolError(
                f"the peer returned {returned} credits, more than its {self._peer_limit} buffers"
            )

    def deliver_run(self) -> None:
        """Hand the collected DATA messages to the reader as one buffer, then repost them."""
        count = self._run_count
        if not count:
            return
        slot = self._run_slot
        self._run_count = 0
        buf, start = self._recv_at(slot)
        self._on_data(buf[start : start + self._run_len])
        for i in range(slot, slot + count):
            self._repost(i)

    def _deliver(self, kind: int, slot: int, length: int) -> None:
        if kind == DATA:
            buf, start = self._recv_at(slot)
            self._on_data(buf[start : start + length])
            self._repost(slot)
        elif kind == EOF:
            self._repost(slot)
            self.eof_delivered = True
            self._on_eof()
        elif not self.eof_delivered:  # CLOSE
            self.eof_delivered = True
            self._on_eof()

    def _repost(self, slot: int) -> None:
        if self.stopped or slot < self._ring_start:  # a retired handshake buffer
            return
        self._device.post_recv(slot)
        self._owed += 1

    def resume(self) -> None:
        """Deliver what arrived while paused, until the reader pauses again."""
        self.paused = False
        while self._pending and not self.paused and not self.stopped:
            kind, slot, length = self._pending.popleft()
            self._deliver(kind, slot, length)

    @property
    def all_delivered(self) -> bool:
        return not self._pending and not self._run_count

    def drop_received(self) -> None:
        """Forget undelivered messages (the connection is gone)."""
        self._pending.clear()
        self._run_count = 0

    # -- sending -------------------------------------------------------------
    def on_send_done(self, wr_id: int) -> None:
        """A signaled send completed: it and every earlier send free their slots."""
        sq = self._sq
        start = self._ring_start
        while sq and sq[0][0] <= wr_id:
            _, slot = sq.popleft()
            if slot >= start:  # (NO_SLOT and retired handshake slots are below)
                self._free_slots.append(slot)

    def post(self, kind: int, slot: int = NO_SLOT, length: int = 0, signal: bool = False) -> int:
        """Queue one SEND-with-immediate for :meth:`flush`; returns its sequence number (wr_id)."""
        self._seq += 1
        wr_id = self._seq
        self._since_signal += 1
        if signal or self._since_signal >= self._signal_every:
            self._since_signal = 0
            signal = True
        imm = (kind << KIND_SHIFT) | self._owed
        self._granted += self._owed
        self._owed = 0
        self._batch.append((wr_id, slot, length, signal, imm))
        self.credits -= 1
        if self._peer_small_left > 0:  # this message takes one of the peer's handshake buffers
            self._peer_small_left -= 1
            if not self._peer_small_left:
                self._target = self._peer_bufsize
        self._sq.append((wr_id, slot))
        return wr_id

    def flush(self) -> bool:
        """Post the queued sends as one chain; True if anything was posted."""
        batch = self._batch
        if not batch:
            return False
        self._batch = []
        self._device.post_sends(batch)
        return True

    def write(self, buffers: Sequence[Buffer]) -> None:
        """Queue bytes to send (:meth:`pump` sends them)."""
        for buf in buffers:
            if len(buf):
                view = memoryview(buf).cast("B")
                self._queue.append(view)
                self.queued += len(view)

    def write_eof(self) -> None:
        """Queue an EOF after the queued bytes."""
        self.eof_queued = True
        self._queue.append(EOF)

    @property
    def queue_empty(self) -> bool:
        return not self._queue

    def pump(self) -> bool:
        """Send GROW, queued bytes while credits and send slots allow, owed credits.

        True if the send queue was not empty (its size may have changed).
        """
        if self.stopped:
            return False
        if self._grow_due and self.credits >= 1 and len(self._sq) < self.max_send:
            self._grow_due = False
            self.post(GROW)
        had_queue = bool(self._queue)
        if had_queue:
            self._send_queued()
        if self._owed:
            self._maybe_return_credits()
        return had_queue

    def _send_queued(self) -> None:
        """Copy queued bytes into free send slots, one message per slot, while credits allow."""
        queue = self._queue
        free = self._free_slots
        size = self._ring_size
        bufsize = min(size, self._target)
        ring_end = self._ring_start + self._ring_depth
        view = self._send
        while queue and self.credits >= 2 and len(self._sq) < self.max_send:
            head = queue[0]
            if isinstance(head, int):  # EOF marker
                queue.popleft()
                self.post(EOF)
                continue
            if not free:
                break
            slot = free[0]
            # Fill as many consecutive free slots as credits allow with one copy per chunk
            # (far fewer, larger copies for bulk data), then post one message per slot.
            # (One at a time while the size of the peer's next buffers changes.)
            room = bufsize
            if self.queued > bufsize and bufsize == size and self._peer_small_left <= 0:
                run = min(len(free), ring_end - slot, self.credits - 1)
                room = min(run, self.max_send - len(self._sq)) * bufsize
            base = (slot - self._ring_start) * size
            filled = 0
            while queue and filled < room and not isinstance(queue[0], int):
                chunk = queue[0]
                assert isinstance(chunk, memoryview)
                take = min(len(chunk), room - filled)
                view[base + filled : base + filled + take] = chunk[:take]
                filled += take
                if take == len(chunk):
                    queue.popleft()
                else:
                    queue[0] = chunk[take:]
            self.queued -= filled
            for offset in range(0, filled, bufsize):
                free.popleft()
                self.post(DATA, slot, min(bufsize, filled - offset))
                slot += 1
            bufsize = min(size, self._target)

    def _maybe_return_credits(self) -> None:
        if self._owed == 0 or self.credits < 1 or len(self._sq) >= self.max_send:
            return
        peer_can_send = self._granted - self.received
        if self._owed >= self._credit_threshold or peer_can_send <= 1:
            self.post(CREDIT)

    def send_now(self, frame: Buffer) -> bool:
        """Send one whole frame straight into a free slot if it fits one message and
        nothing is queued; False if it must go through :meth:`write` instead."""
        size = len(frame)
        if (
            self._queue
            or self.stopped
            or self._grow_due
            or size > self._target
            or size > self._ring_size
            or self.credits < 2
            or not self._free_slots
            or len(self._sq) >= self.max_send
            or type(frame) not in (bytes, bytearray)
        ):
            return False
        slot = self._free_slots.popleft()
        base = (slot - self._ring_start) * self._ring_size
        self._send[base : base + size] = frame
        self.post(DATA, slot, size)
        return True

    def clear(self) -> None:
        """Drop everything queued or undelivered, and the links back to the owner (the
        stream was released: freed at once, without the cyclic GC)."""
        self.stopped = True
        self._queue.clear()
        self.queued = 0
        self.drop_received()
        self._on_data = self._on_eof = _dropped


def _dropped(*_: object) -> None:
    """Receives nothing: what a released connection delivers to."""
