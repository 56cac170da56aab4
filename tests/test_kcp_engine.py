"""The C KCP engine through its cffi binding, without sockets (simulated time and link)."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrpc.transports.kcp import engine as kcp_engine

pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from polyrpc.transports.kcp.engine import KcpEngine  # noqa: E402
from tests.kcp_sim import Link, OurEndpoint  # noqa: E402

HEADER = struct.Struct("<IBBHIIII")


def segments(datagram: bytes) -> list[tuple[int, ...]]:
    """Split a datagram into (conv, cmd, frg, wnd, ts, sn, una, len) tuples."""
    out = []
    pos = 0
    while pos < len(datagram):
        fields = HEADER.unpack_from(datagram, pos)
        out.append(fields)
        pos += HEADER.size + fields[7]
    assert pos == len(datagram)
    return out


def pair(**kw) -> tuple[KcpEngine, KcpEngine]:
    return KcpEngine(0x11223344, **kw), KcpEngine(0x11223344, **kw)


def test_header_layout_is_little_endian_24_bytes():
    eng = KcpEngine(0xA1B2C3D4, rcvwnd=200)
    eng.send(b"hello")
    eng.flush(777)
    (dgram,) = eng.take_output()
    assert len(dgram) == 24 + 5
    assert dgram[:4] == bytes([0xD4, 0xC3, 0xB2, 0xA1])
    conv, cmd, frg, wnd, ts, sn, una, length = HEADER.unpack_from(dgram)
    assert (conv, cmd, frg, wnd, ts, sn, una, length) == (0xA1B2C3D4, 81, 0, 200, 777, 0, 0, 5)
    assert dgram[24:] == b"hello"


def test_message_fragmentation_and_reassembly():
    a, b = pair(sndwnd=64, rcvwnd=128, nodelay=1, interval=10, resend=2, nocwnd=1)
    message = bytes(random.Random(3).randrange(256) for _ in range(5000))
    a.send(message)
    a.flush(1)
    segs = [s for d in a.take_output() for s in segments(d)]
    assert [s[2] for s in segs] == [3, 2, 1, 0]
    assert [s[5] for s in segs] == [0, 1, 2, 3]
    assert all(s[7] == 1376 for s in segs[:3]) and segs[3][7] == 5000 - 3 * 1376
    link = Link(OurEndpoint(a), OurEndpoint(b))
    sizes = [0, 1, 1376, 1377, 10_000, 3]
    for n in sizes:
        a.send(bytes([n % 251]) * n)
    link.run_until(lambda: len(link.got["b"]) == 1 + len(sizes))
    assert link.got["b"][0] == message
    assert [len(m) for m in link.got["b"][1:]] == sizes


def test_message_too_many_fragments_is_refused():
    eng = KcpEngine(1, mtu=100)
    with pytest.raises(ValueError, match="255 fragments"):
        eng.send(b"x" * (76 * 256))
    eng.send(b"x" * (76 * 255))


def test_stream_mode_coalesces_small_writes():
    a, b = pair(stream=True, nodelay=1, interval=10, resend=2, nocwnd=1)
    for i in range(100):
        a.send(bytes([i]) * 20)
    a.flush(1)
    segs = [s for d in a.take_output() for s in segments(d)]
    assert [s[7] for s in segs] == [1376, 2000 - 1376]
    assert all(s[2] == 0 for s in segs)
    link = Link(OurEndpoint(a), OurEndpoint(b))
    a.send(b"tail")
    link.run_until(lambda: sum(map(len, link.got["b"])) >= 2004)
    assert b"".join(link.got["b"]) == b"".join(bytes([i]) * 20 for i in range(100)) + b"tail"


@pytest.mark.parametrize("stream", [False, True])
def test_transfer_with_loss_arrives_intact(stream):
    a, b = pair(stream=stream, sndwnd=128, rcvwnd=128, nodelay=1, interval=10, resend=2, nocwnd=1)
    link = Link(OurEndpoint(a), OurEndpoint(b), loss=0.2, seed=7, delay=10)
    rng = random.Random(9)
    chunks = [rng.randbytes(rng.randrange(1, 6000)) for _ in range(150)]
    for c in chunks:
        a.send(c)
    total = sum(map(len, chunks))
    link.run_until(lambda: sum(map(len, link.got["b"])) >= total)
    if stream:
        assert b"".join(link.got["b"]) == b"".join(chunks)
    else:
        assert link.got["b"] == chunks
    st = a.stats()
    assert st["retransmits"] + st["fast_retransmits"] > 0
    link.run_until(lambda: a.waitsnd == 0)
    assert a.pending_bytes == 0


def test_cumulative_una_releases_segments_whose_acks_were_lost():
    a, b = pair(nodelay=1, interval=10, resend=0, nocwnd=1)
    for i in range(5):
        a.send(bytes([i]) * 100)
    a.flush(1)
    for d in a.take_output():
        b.input(d, 2)
    b.flush(2)
    b.take_output()  # every ACK segment is lost
    assert a.waitsnd == 5
    b.send(b"reply")
    b.flush(3)
    (dgram,) = b.take_output()
    (seg,) = segments(dgram)
    assert seg[1] == 81 and seg[6] == 5  # una = next expected sn
    a.input(dgram, 4)
    assert a.waitsnd == 0 and a.pending_bytes == 0


def test_fast_retransmit_beats_the_timer():
    a, b = pair(sndwnd=32, rcvwnd=32, nodelay=1, interval=10, resend=2, nocwnd=1)
    dropped = []

    def drop(side, d):
        if side == "a" and not dropped and segments(d)[0][5] == 3 and segments(d)[0][1] == 81:
            dropped.append(d)
            return True
        return False

    link = Link(OurEndpoint(a), OurEndpoint(b), delay=20, drop=drop)
    for i in range(10):
        a.send(bytes([i]) * 1000)
        link.step()
    took = link.run_until(lambda: len(link.got["b"]) == 10)
    assert dropped
    assert a.stats()["fast_retransmits"] >= 1
    assert a.stats()["retransmits"] == 0
    assert took < 3 * 20 + 30


def test_rtt_estimate_and_minimum_rto():
    a, b = pair(nodelay=0, interval=40)
    link = Link(OurEndpoint(a), OurEndpoint(b), delay=25)
    for i in range(20):
        a.send(b"x" * 10)
        link.run_until(lambda i=i: len(link.got["b"]) == i + 1)
        link.run_until(lambda: a.waitsnd == 0)
    st = a.stats()
    assert 45 <= st["srtt"] <= 55
    assert st["rto"] >= 100  # normal mode floor
    c, d = pair(nodelay=1, interval=10)
    link2 = Link(OurEndpoint(c), OurEndpoint(d), delay=1)
    for _ in range(20):
        c.send(b"y")
        link2.run_until(lambda: c.waitsnd == 0)
    assert c.stats()["rto"] == 30  # nodelay floor


@pytest.mark.parametrize(
    ("nodelay", "gaps"),
    [
        (0, [200 + 25, 400, 800, 1600]),  # rto doubles (first wait adds rto/8)
        (1, [200, 300, 450, 675]),  # rto grows by half of itself
        (2, [200, 300, 400, 500]),  # rto grows by half of the estimate
    ],
)
def test_retransmit_backoff_variants(nodelay, gaps):
    eng = KcpEngine(5, nodelay=nodelay, interval=10, nocwnd=1)
    eng.send(b"lost forever")
    now = 0
    eng.flush(now)
    sends = [now] if eng.take_output() else []
    while len(sends) < len(gaps) + 1:
        now = eng.check(now)
        eng.flush(now)
        if eng.take_output():
            sends.append(now)
    assert [b - a for a, b in itertools.pairwise(sends)] == gaps


def test_dead_link_after_retransmit_limit():
    eng = KcpEngine(5, nodelay=1, interval=10, nocwnd=1, dead_link=5)
    eng.send(b"nobody listens")
    now = 0
    eng.flush(now)
    while not eng.dead:
        now = eng.check(now)
        eng.flush(now)
        assert now < 60_000
    assert eng.stats()["retransmits"] == 4


def test_send_window_limits_flight():
    a = KcpEngine(9, sndwnd=4, nodelay=1, interval=10, nocwnd=1)
    for _ in range(10):
        a.send(b"z" * 100)
    a.flush(0)
    segs = [s for d in a.take_output() for s in segments(d)]
    assert [s[5] for s in segs] == [0, 1, 2, 3]
    assert a.waitsnd == 10


def test_congestion_window_slow_start_in_normal_mode():
    a = KcpEngine(9, sndwnd=64)
    for _ in range(10):
        a.send(b"z" * 100)
    a.flush(0)
    segs = [s for d in a.take_output() for s in segments(d)]
    assert len(segs) == 1  # cwnd starts at one segment


def test_receive_window_closes_probes_and_reopens():
    a, b = pair(sndwnd=64, rcvwnd=128, stream=True, nodelay=1, interval=10, resend=2, nocwnd=1)
    received = []

    class Paused(OurEndpoint):
        reading = False

        def received(self):
            return super().received() if self.reading else []

    eb = Paused(b)
    link = Link(OurEndpoint(a), eb, delay=2)
    a.send(b"q" * (1376 * 300))
    link.run_until(lambda: a.stats()["rmt_wnd"] == 0, limit_ms=5000)
    assert b.stats()["rcv_queue"] == 128
    sent_before = a.stats()["out_segments"]
    # nothing moves while the window is shut, except a probe after 7 s
    link.run_until(lambda: a.stats()["window_probes"] >= 1, limit_ms=20_000)
    link.run_until(lambda: any(d[4] == 84 for d in link.wire["b"]), limit_ms=100)
    probes = [s for d in link.wire["a"] for s in segments(d) if s[1] == 83]
    tells = [s for d in link.wire["b"] for s in segments(d) if s[1] == 84]
    assert probes and tells
    assert a.stats()["out_segments"] - sent_before <= 3
    eb.reading = True
    link.run_until(lambda: sum(map(len, link.got["b"])) >= 1376 * 300, limit_ms=5000)
    received.extend(link.got["b"])
    assert b"".join(received) == b"q" * (1376 * 300)


def test_check_reports_deadlines():
    eng = KcpEngine(3, nodelay=1, interval=10)
    assert eng.check(50) is None
    eng.send(b"a")
    assert eng.check(50) == 50
    eng.flush(50)
    assert eng.check(51) == 50 + 200  # first RTO before any estimate


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\x01" * 23,
        struct.pack("<IBBHIIII", 0xDEAD, 81, 0, 32, 0, 0, 0, 0),  # wrong conv
        struct.pack("<IBBHIIII", 7, 99, 0, 32, 0, 0, 0, 0),  # unknown command
        struct.pack("<IBBHIIII", 7, 81, 0, 32, 0, 0, 0, 0xFFFFFFFF) + b"abc",  # absurd length
        struct.pack("<IBBHIIII", 7, 81, 0, 32, 0, 0, 0, 10) + b"short",  # truncated payload
        struct.pack("<IBBHIIII", 7, 82, 0, 32, 0, 0, 500, 0),  # una beyond what was sent
        struct.pack("<IBBHIIII", 7, 84, 0, 32, 0, 0, 0, 0) + b"\x00" * 7,  # trailing junk
    ],
)
def test_malformed_datagrams_are_dropped_and_counted(datagram):
    a, b = KcpEngine(7), KcpEngine(7)
    assert a.input(datagram, 1) < 0
    assert a.stats()["dropped_malformed"] == 1
    assert a.recv() is None
    b.send(b"still fine")
    b.flush(2)
    for d in b.take_output():
        assert a.input(d, 3) == 0
    assert a.recv() == b"still fine"


def test_random_garbage_never_crashes():
    rng = random.Random(42)
    eng = KcpEngine(7, stream=True)
    for _ in range(3000):
        n = rng.randrange(0, 200)
        data = bytearray(rng.randbytes(n))
        if n >= 24 and rng.random() < 0.5:
            data[0:4] = (7).to_bytes(4, "little")
            data[4] = rng.choice([81, 82, 83, 84])
        eng.input(bytes(data), rng.randrange(1 << 32))
        eng.flush(rng.randrange(1 << 32))
        eng.take_output()
        eng.recv()
    assert eng.stats()["dropped_malformed"] > 0


def test_sequence_numbers_and_clock_wrap():
    a, b = pair(stream=True, nodelay=1, interval=10, resend=2, nocwnd=1)
    link = Link(OurEndpoint(a), OurEndpoint(b), start=(1 << 32) - 500, loss=0.1, seed=3)
    payload = random.Random(1).randbytes(300_000)
    a.send(payload)
    link.run_until(lambda: sum(map(len, link.got["b"])) >= len(payload))
    assert b"".join(link.got["b"]) == payload


def test_a_datagram_malformed_anywhere_is_dropped_whole():
    a, b = KcpEngine(7, stream=True), KcpEngine(7, stream=True)
    b.send(b"first")
    b.flush(1)
    (good,) = b.take_output()
    assert a.input(good + b"\x00" * 5, 2) < 0  # a valid segment followed by junk
    assert a.input(good + struct.pack("<IBBHIIII", 8, 81, 0, 32, 0, 1, 0, 0), 2) < 0
    assert a.recv() is None and a.stats()["in_segments"] == 0
    assert a.input(good, 3) == 0
    assert a.recv() == b"first"


def test_batched_input_counts_well_formed_datagrams():
    a, b = KcpEngine(7, stream=True), KcpEngine(7, stream=True, nocwnd=1)
    b.send(b"x" * 5000)
    b.flush(1)
    batch = b.take_output()
    assert len(batch) == 4
    assert a.input_many([batch[0], b"junk", *batch[1:], b"\x00" * 30], 2) == 4
    assert a.recv() == b"x" * 5000
    assert a.stats()["dropped_malformed"] == 2


# -- property tests: whatever a peer sends, the engine accepts it whole or drops it whole --

CONV = 0x5EED


def mid_conversation() -> tuple[KcpEngine, KcpEngine]:
    """Two engines that have exchanged data both ways (non-zero sequence numbers)."""
    a, b = KcpEngine(CONV, stream=True), KcpEngine(CONV, stream=True)
    link = Link(OurEndpoint(a), OurEndpoint(b), delay=2)
    link.a.send(b"x" * 5000)
    link.b.send(b"y" * 3000)
    link.run_until(lambda: len(b"".join(link.got["b"])) == 5000 and link.got["a"], 10_000)
    link.run_until(lambda: len(b"".join(link.got["a"])) == 3000, 10_000)
    for _ in range(50):
        link.step()
    return a, b


STATE = ("snd_queue", "snd_buf", "rcv_queue", "rcv_buf", "rmt_wnd", "srtt", "rto", "cwnd")


def segment_strategy() -> st.SearchStrategy[bytes]:
    """One segment, mostly plausible (our conv, a KCP command, numbers near ours)."""
    return st.builds(
        lambda conv, cmd, frg, wnd, ts, sn, una, data, lie: (
            HEADER.pack(conv, cmd, frg, wnd, ts, sn, una, (len(data) + lie) % 2**32) + data
        ),
        st.one_of(st.just(CONV), st.integers(0, 2**32 - 1)),
        st.one_of(st.sampled_from([81, 82, 83, 84]), st.integers(0, 255)),
        st.integers(0, 255),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**32 - 1),
        st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
        st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
        st.binary(max_size=64),
        st.one_of(st.just(0), st.integers(-64, 64), st.just(2**31)),
    )


def datagram_strategy() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        st.lists(segment_strategy(), min_size=1, max_size=4).map(b"".join),
        st.tuples(st.lists(segment_strategy(), min_size=1, max_size=3), st.binary(max_size=30)).map(
            lambda t: b"".join(t[0]) + t[1]
        ),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagram=datagram_strategy(), now=st.integers(0, 2**32 - 1))
def test_any_datagram_is_taken_whole_or_dropped_whole(datagram, now):
    a, _ = mid_conversation()
    before = {k: v for k, v in a.stats().items() if k in STATE}
    dropped = a.stats()["dropped_malformed"]
    rc = a.input(datagram, now)
    after = a.stats()
    if rc < 0:
        assert after["dropped_malformed"] == dropped + 1
        assert {k: v for k, v in after.items() if k in STATE} == before
    else:
        assert rc == 0 and after["dropped_malformed"] == dropped
    assert after["rcv_queue"] <= after["rcv_wnd"] and after["rcv_buf"] <= after["rcv_wnd"]
    a.flush(now)
    for out in a.take_output():  # whatever it answers is well-formed
        assert all(seg[0] == CONV and seg[1] in (81, 82, 83, 84) for seg in segments(out))
    a.recv()


def corrupt(datagram: bytes, how: int, where: int) -> bytes:
    """A datagram made malformed in one of the ways the validator must catch."""
    segs, pos = [], 0
    while pos < len(datagram):
        n = HEADER.size + HEADER.unpack_from(datagram, pos)[7]
        segs.append(bytearray(datagram[pos : pos + n]))
        pos += n
    seg = segs[where % len(segs)]
    if how == 0:  # trailing bytes shorter than a header
        return datagram + b"\x00" * (1 + where % 23)
    if how == 1:  # a command KCP does not have
        seg[4] = 85 + where % 100
    elif how == 2:  # another conversation
        seg[0:4] = (CONV ^ (1 + where)).to_bytes(4, "little")
    else:  # a length beyond the datagram
        seg[20:24] = (len(datagram) + 1 + where).to_bytes(4, "little")
    return b"".join(segs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attacks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1000)), min_size=1),
    seed=st.integers(0, 1000),
)
def test_malformed_copies_of_real_datagrams_never_disturb_a_transfer(attacks, seed):
    a, b = KcpEngine(CONV, stream=True), KcpEngine(CONV, stream=True)
    pending = iter(attacks * 100)

    class Attacked(OurEndpoint):
        def input(self, datagram: bytes, now: int) -> None:
            how, where = next(pending, (0, 0))
            assert self.engine.input(corrupt(datagram, how, where), now) < 0
            super().input(datagram, now)

    data = random.Random(seed).randbytes(50_000)
    link = Link(Attacked(a), Attacked(b), delay=3, loss=0.05, seed=seed)
    link.a.send(data)
    link.run_until(lambda: len(b"".join(link.got["b"])) >= len(data), 60_000)
    assert b"".join(link.got["b"]) == data
    assert a.stats()["dropped_malformed"] > 0 and b.stats()["dropped_malformed"] > 0
