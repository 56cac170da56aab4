"""Property tests of what a peer can make the KCP engine do: arbitrary datagrams, alone or
injected into a live conversation (tests/kcp_sim.py), never crash it, a rejected datagram
changes nothing but the counters, and a conversation survives the rejected ones.
(tests/fuzz/kcp_input_fuzzer.c fuzzes the same engine, coverage-guided, in scripts/fuzz.sh.)"""

from __future__ import annotations

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

CONV = 0x11223344
HEADER = struct.Struct("<IBBHIIII")
COUNTERS = {"in_datagrams", "dropped_malformed"}
CMDS = st.sampled_from([81, 82, 83, 84]) | st.integers(0, 255)


def engine() -> KcpEngine:
    return KcpEngine(CONV, sndwnd=64, rcvwnd=64, nodelay=1, interval=10, resend=2, nocwnd=1)


def segment(cmd: int, frg: int, wnd: int, ts: int, sn: int, una: int, data: bytes) -> bytes:
    return HEADER.pack(CONV, cmd, frg, wnd, ts, sn, una, len(data)) + data


segments = st.builds(
    segment,
    CMDS,
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1) | st.integers(0, 8),
    st.integers(0, 2**32 - 1) | st.integers(0, 8),
    st.binary(max_size=64),
)
# well-formed-looking segments (right conv, header lengths that add up), cut or garbled, or
# plain random bytes
datagrams = st.one_of(
    st.binary(max_size=200),
    st.lists(segments, min_size=1, max_size=4).map(b"".join),
    st.tuples(st.lists(segments, min_size=1, max_size=3).map(b"".join), st.integers(0, 300)).map(
        lambda t: t[0][: t[1]]
    ),
)


def state(e: KcpEngine) -> dict:
    return {k: v for k, v in e.stats().items() if k not in COUNTERS}


def test_an_echoed_timestamp_from_long_ago_keeps_the_rtt_estimate_bounded():
    """A forged ACK whose timestamp is 2**31 ms old overflowed the RTT arithmetic (signed
    overflow, found by kcp_input_fuzzer under UBSan): the sample is capped at RTO_MAX."""
    e = engine()
    e.send(b"x")
    e.flush(1000)
    e.take_output()
    now = 5000
    assert e.input(segment(82, 0, 64, (now - 0x7FFFFFFF) % 2**32, 0, 0, b""), now) == 0
    stats = e.stats()
    assert 0 < stats["srtt"] <= 60_000
    assert stats["srtt"] <= stats["rto"] <= 60_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams, min_size=1, max_size=6), st.booleans())
def test_a_rejected_datagram_changes_nothing_but_the_counters(garbage, busy):
    e = engine()
    if busy:  # data in flight, so acknowledgements and una have something to act on
        e.send(b"m" * 3000)
        e.flush(1000)
        e.take_output()
    for d in garbage:
        before = state(e)
        dropped = e.stats()["dropped_malformed"]
        rc = e.input(d, 1010)
        assert isinstance(rc, int)
        if rc < 0:
            assert state(e) == before
            assert e.stats()["dropped_malformed"] == dropped + 1
        e.flush(1020)
        e.take_output()
        e.recv()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 400), datagrams), min_size=1, max_size=10),
    st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4),
)
def test_a_conversation_survives_injected_garbage(injections, messages):
    """Datagrams of a hostile third party, injected into a live simulated conversation:
    nothing crashes, and when every injected datagram was rejected every message arrives."""
    a, b = engine(), engine()
    link = Link(OurEndpoint(a), OurEndpoint(b), delay=5)
    for m in messages:
        link.a.send(m)
    accepted = 0
    for at, d in sorted(injections, key=lambda t: t[0]):
        while link.now < 1000 + at:
            link.step()
        accepted += (b if at % 2 else a).input(d, link.now) == 0
    if accepted:
        for _ in range(3000):  # whatever it did, the engines keep working
            link.step()
        assert all(isinstance(x, bytes) for x in link.got["b"])
        return
    link.run_until(lambda: len(link.got["b"]) == len(messages), limit_ms=60_000)
    assert link.got["b"] == messages
