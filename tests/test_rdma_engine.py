"""Property tests of the rdma transport's message path without verbs (host suite).

The sans-IO core (polyrpc/transports/rdma/engine.py) is driven here as the stream drives it
in the VM, but over a simulated Reliable Connected queue pair: receives complete in the
order they were posted, a message with no posted receive is a receiver-not-ready (a
flow-control bug), and a send's bytes are read from its slot only when it is delivered (so
a slot reused too early shows as corrupted data). Two engines exchange arbitrary writes,
pauses and EOFs; a hostile peer sends arbitrary immediate data and lengths; arbitrary
connection data goes to the parser. Nothing may crash, state stays bounded, and bad input
is a ProtocolError (ValueError for connection data).
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrpc.errors import ProtocolError
from polyrpc.transports.rdma.engine import (
    CLOSE,
    CREDIT,
    DATA,
    EOF,
    GROW,
    HELLO,
    HS_BUFSIZE,
    HS_DEPTH,
    KIND_SHIFT,
    MAGIC,
    NO_SLOT,
    VERSION,
    PeerInfo,
    RdmaEngine,
    Send,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class Side:
    """One end of the simulated queue pair: its engine, registered rings, posted receives and
    the sends on the wire (the adapter's view: which buffer each work request names)."""

    def __init__(self, depth: int, bufsize: int, peer_depth: int, peer_bufsize: int) -> None:
        self.depth, self.bufsize = depth, bufsize
        self.rings = {
            "recv": [bytearray(HS_DEPTH * HS_BUFSIZE)],
            "send": [bytearray(HS_DEPTH * HS_BUFSIZE)],
        }
        self.posted: collections.deque[int] = collections.deque(range(HS_DEPTH))
        self.wire: collections.deque[Send] = collections.deque()
        self.delivered: collections.deque[tuple[int, bool]] = collections.deque()
        self.got = bytearray()
        self.eofs = 0
        self.sent = bytearray()
        self.engine = RdmaEngine(
            self,
            memoryview(self.rings["recv"][0]),
            memoryview(self.rings["send"][0]),
            depth,
            bufsize,
            2 * depth + 4,
            peer_depth,
            peer_bufsize,
            self.got.extend,
            self._eof,
        )

    def _eof(self) -> None:
        self.eofs += 1

    def at(self, ring: str, slot: int) -> memoryview:
        """The buffer of ``slot`` in the receive or send ring (handshake ring first)."""
        if slot < HS_DEPTH:
            return memoryview(self.rings[ring][0])[slot * HS_BUFSIZE : (slot + 1) * HS_BUFSIZE]
        start = (slot - HS_DEPTH) * self.bufsize
        return memoryview(self.rings[ring][1])[start : start + self.bufsize]

    def post_recv(self, slot: int) -> None:
        assert slot not in self.posted, f"slot {slot} posted twice"
        self.posted.append(slot)

    def post_sends(self, batch: list[Send]) -> None:
        for send in batch:
            assert send[1] != NO_SLOT or send[2] == 0
            self.wire.append(send)

    def grow(self) -> tuple[memoryview, memoryview]:
        for ring in self.rings.values():
            ring.append(bytearray(self.depth * self.bufsize))
        return memoryview(self.rings["recv"][1]), memoryview(self.rings["send"][1])

    def settle(self) -> None:
        """What the stream does after handling completions: deliver, pump, post."""
        self.engine.deliver_run()
        self.engine.pump()
        self.engine.flush()

    def write(self, data: bytes) -> None:
        self.sent += data
        self.engine.write([data])
        self.settle()

    def complete_sends(self) -> None:
        """The adapter acknowledges every delivered send (only signaled ones complete)."""
        while self.delivered:
            wr_id, signaled = self.delivered.popleft()
            if signaled:
                self.engine.on_send_done(wr_id)
        self.settle()

    def check(self) -> None:
        engine = self.engine
        assert engine.credits >= 0
        assert len(self.posted) <= HS_DEPTH + self.depth
        assert engine.received <= engine._granted
        assert len(engine._pending) <= HS_DEPTH + self.depth
        assert engine.registered_bytes == sum(
            len(r) for rings in self.rings.values() for r in rings
        )


def deliver(src: Side, dst: Side, count: int) -> None:
    """Move up to ``count`` messages from src's wire into dst's next posted receives."""
    for _ in range(count):
        if not src.wire:
            break
        wr_id, slot, length, signaled, imm = src.wire.popleft()
        assert dst.posted, "receiver not ready: a message was sent without a credit"
        into = dst.posted.popleft()
        target = dst.at("recv", into)
        assert length <= len(target), "a message longer than the receive buffer it landed in"
        if length:
            target[:length] = src.at("send", slot)[:length]
        src.delivered.append((wr_id, signaled))
        dst.engine.on_recv(into, length, imm)
    dst.settle()


CYCLE = bytes(range(256)) * 200


def pattern(n: int, seed: int) -> bytes:
    """n bytes counting up from seed (mod 256): misplaced or repeated bytes show."""
    start = seed & 0xFF
    return CYCLE[start : start + n]


def inject(me: Side, length: int, imm: int) -> None:
    """The peer's message lands in this side's next posted receive."""
    me.engine.on_recv(me.posted.popleft(), length, imm)


sizes = st.sampled_from([(4, 4096), (8, 4096), (4, 8192), (16, 4096)])
ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["write", "send_now", "deliver", "complete", "pause", "resume", "eof", "grow"]
        ),
        st.integers(0, 1),
        st.integers(0, 40000),
    ),
    max_size=40,
)


@settings(SETTINGS, max_examples=60)
@given(sizes, sizes, ops)
def test_two_engines_deliver_every_byte_in_order_without_rnr(a_size, b_size, steps):
    """Arbitrary writes, pauses, partial deliveries, EOFs and ring growth on either side at
    any time: all bytes arrive, in order, no message lacks a receive buffer that fits it,
    and the state stays bounded throughout."""
    a = Side(*a_size, *b_size)
    b = Side(*b_size, *a_size)
    sides = (a, b)
    for op, who, n in steps:
        me, other = sides[who], sides[1 - who]
        if op in ("write", "send_now") and not me.engine.eof_queued:
            data = pattern(n, len(me.sent))
            if op == "send_now" and me.engine.send_now(data):
                me.sent += data
                me.engine.flush()
            else:
                me.write(data)
        elif op == "deliver":
            deliver(me, other, n % 50)
        elif op == "complete":
            me.complete_sends()
        elif op == "pause":
            other.engine.paused = True
        elif op == "resume":
            other.engine.resume()
            other.settle()
        elif op == "grow":
            me.engine.grow()
            me.engine.flush()
        elif op == "eof" and not me.engine.eof_queued:
            me.engine.write_eof()
            me.settle()
        for side in sides:
            side.check()
    for side in sides:
        side.engine.resume()
        side.settle()
    run_until_quiet(a, b)
    for me, other in ((a, b), (b, a)):
        assert me.engine.queue_empty
        assert bytes(other.got) == bytes(me.sent)
        assert other.eofs == int(me.engine.eof_queued)


def run_until_quiet(a: Side, b: Side) -> None:
    for _ in range(10000):
        if not (a.wire or b.wire or a.delivered or b.delivered):
            return
        deliver(a, b, 50)
        deliver(b, a, 50)
        a.complete_sends()
        b.complete_sends()


@pytest.mark.parametrize("order", ["together", "writer first", "reader first"])
def test_after_grow_the_peers_handshake_buffers_are_filled_first(order):
    """A GROW names the full buffers posted behind the handshake ones the sender still holds
    credits for: those credits carry messages of at most 4 KiB, the later ones up to bufsize."""
    a = Side(8, 65536, 8, 65536)
    b = Side(8, 65536, 8, 65536)
    first, second = (a, b) if order != "reader first" else (b, a)
    first.engine.grow()
    first.engine.flush()
    if order != "together":
        run_until_quiet(a, b)
    second.engine.grow()
    second.engine.flush()
    a.write(pattern(300_000, 0))
    b.write(pattern(200_000, 7))
    run_until_quiet(a, b)
    assert bytes(b.got) == bytes(a.sent) and bytes(a.got) == bytes(b.sent)
    assert a.engine.registered_bytes == b.engine.registered_bytes == (32 << 10) + 2 * 8 * 65536


imms = st.builds(
    lambda kind, credits: (kind << KIND_SHIFT) | credits,
    st.sampled_from([DATA, EOF, CLOSE, CREDIT, GROW]) | st.integers(0, 255),
    st.integers(0, 12) | st.integers(0, (1 << KIND_SHIFT) - 1),
)
hostile = st.lists(st.tuples(st.integers(0, 4096) | st.integers(-5, 1 << 20), imms), max_size=80)


@SETTINGS
@given(hostile, st.lists(st.integers(0, 20000), max_size=5), st.booleans())
def test_hostile_peer_messages_are_refused_cleanly(messages, writes, paused):
    """A peer that sends whatever immediate data and lengths it likes: each message is taken
    or refused with a ProtocolError, never another exception, and nothing grows unbounded."""
    me = Side(8, 4096, 8, 4096)
    me.engine.paused = paused
    for n in writes:
        me.write(pattern(n, 0))
    for length, imm in messages:
        if not me.posted:
            break  # the adapter would refuse the message (receiver not ready)
        try:
            inject(me, length, imm)
        except ProtocolError as exc:
            assert str(exc)
            return  # the stream fails the connection here
        me.settle()
        me.wire.clear()  # the peer never acknowledges: our slots stay taken
        me.check()
        assert me.engine.credits <= HS_DEPTH + 8  # handshake buffers, then the full ring
        assert len(me.got) <= me.engine.received * 4096


@SETTINGS
@given(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40), st.integers(0, 2**32 - 1))
def test_arbitrary_completion_values_never_crash(slot, length, imm):
    """Even values the adapter cannot produce give a ProtocolError at worst."""
    me = Side(4, 4096, 4, 4096)
    if slot in me.posted:
        me.posted.remove(slot)
    try:
        me.engine.on_recv(slot, length, imm)
    except ProtocolError:
        return
    me.settle()


@pytest.mark.parametrize(
    ("imm", "length", "words"),
    [
        (9 << KIND_SHIFT, 0, "unknown message kind"),
        ((CREDIT << KIND_SHIFT) | 3, 0, "more than its 4 buffers"),
        (CREDIT << KIND_SHIFT, 10, "payload in a control message"),
        (DATA << KIND_SHIFT, 5000, "5000-byte message"),
    ],
)
def test_protocol_violations_are_named(imm, length, words):
    me = Side(4, 4096, 4, 4096)
    me.write(b"x")  # one credit spent: 3 left, so 3 returned credits would be 6 > 4
    me.engine.credits += 2
    with pytest.raises(ProtocolError, match=words):
        me.engine.on_recv(0, length, imm)


def test_a_handshaking_connection_registers_32_kib_until_it_grows():
    """Before the polyrpc handshake a connection holds only its handshake rings (issue #14:
    at most 64 KiB per handshaking connection), whatever depth and bufsize it will use."""
    me = Side(32, 65536, 32, 65536)
    assert me.engine.registered_bytes == 2 * HS_DEPTH * HS_BUFSIZE == 32 << 10
    me.engine.grow()
    assert me.engine.registered_bytes == (32 << 10) + 2 * 32 * 65536
    me.check()


def test_grow_twice_is_refused():
    me = Side(4, 4096, 4, 4096)
    inject(me, 0, GROW << KIND_SHIFT)
    with pytest.raises(ProtocolError, match="GROW received twice"):
        inject(me, 0, GROW << KIND_SHIFT)


def test_data_after_close_and_sends_without_credit_are_refused():
    me = Side(4, 4096, 4, 4096)
    me.engine.on_recv(0, 0, CLOSE << KIND_SHIFT)
    with pytest.raises(ProtocolError, match="after the peer's CLOSE"):
        me.engine.on_recv(1, 1, DATA << KIND_SHIFT)
    me = Side(4, 4096, 4, 4096)
    me.engine.paused = True  # nothing reposted, so no credit goes back
    for slot in range(4):
        me.engine.on_recv(slot, 1, DATA << KIND_SHIFT)
    with pytest.raises(ProtocolError, match="without a credit"):
        me.engine.on_recv(0, 1, DATA << KIND_SHIFT)


@SETTINGS
@given(st.binary(max_size=HELLO.size + 8))
def test_connection_data_parser_takes_any_bytes(data):
    try:
        PeerInfo.unpack(data)
    except ValueError as exc:
        assert str(exc)


@SETTINGS
@given(
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(min_size=16, max_size=16),
)
def test_connection_data_limits(mtu, depth, bufsize, qpn, psn, gid):
    """Announced depth and bufsize are taken only within the transport's own option ranges
    (a zero bufsize once made every write raise ValueError in the sender)."""
    data = HELLO.pack(MAGIC, VERSION, mtu, depth, bufsize, qpn, psn, gid)
    valid = 4 <= depth <= 4096 and 4096 <= bufsize <= 16 << 20 and bufsize & (bufsize - 1) == 0
    if valid:
        assert PeerInfo.unpack(data) == PeerInfo(mtu, depth, bufsize, qpn, psn, gid)
    else:
        with pytest.raises(ValueError, match="the peer announced"):
            PeerInfo.unpack(data)
