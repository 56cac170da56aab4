"""Interop: polyrpc's KCP engine and the reference ikcp.c (as shipped in the aiokcp and kcp
PyPI packages) exchange segments over real loopback UDP sockets, in both directions."""

from __future__ import annotations

import random
import select
import socket
import time

import pytest

from polyrpc.transports.kcp import engine as kcp_engine

aiokcp = pytest.importorskip("aiokcp", reason="pip install aiokcp (reference KCP)")
pytest.importorskip("kcp", reason="pip install kcp (reference KCP)")
pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from polyrpc.transports.kcp.engine import KcpEngine, now_ms  # noqa: E402
from tests.kcp_sim import OurEndpoint, RefEndpoint  # noqa: E402

CONV = 0x0BADF00D
REF_FAST = dict(
    no_delay=True,
    update_interval=10,
    resend_count=2,
    no_congestion_control=True,
    send_window_size=128,
    receive_window_size=128,
)


class UdpPair:
    """Our engine on one UDP socket, a reference KCP on another; seeded loss at the senders."""

    def __init__(self, ours: OurEndpoint, ref: RefEndpoint, loss: float = 0.0, seed: int = 1):
        self.ours, self.ref = ours, ref
        self.sock_ours = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock_ref = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.sock_ours, self.sock_ref):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        self.loss = loss
        self.rng = random.Random(seed)
        self.got_ours: list[bytes] = []
        self.got_ref: list[bytes] = []
        self.ref_reading = True
        self.sent = {"ours": 0, "ref": 0}
        self.commands = {"ours": [], "ref": []}

    def close(self) -> None:
        self.sock_ours.close()
        self.sock_ref.close()

    def _send(self, sock: socket.socket, to: socket.socket, datagrams: list[bytes], who: str):
        for d in datagrams:
            self.sent[who] += 1
            self.commands[who].append(d[4])
            if self.loss and self.rng.random() < self.loss:
                continue
            sock.sendto(d, to.getsockname())

    def step(self) -> None:
        now = now_ms()
        self._send(self.sock_ours, self.sock_ref, self.ours.tick(now), "ours")
        self._send(self.sock_ref, self.sock_ours, self.ref.tick(now), "ref")
        readable, _, _ = select.select([self.sock_ours, self.sock_ref], [], [], 0.001)
        now = now_ms()
        for sock in readable:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                (self.ours if sock is self.sock_ours else self.ref).input(data, now)
        self.got_ours.extend(self.ours.received())
        if self.ref_reading:
            self.got_ref.extend(self.ref.received())

    def run_until(self, done, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            assert time.monotonic() < deadline, "exchange did not finish in time"
            self.step()


def ours(stream: bool = False, **kw) -> OurEndpoint:
    settings = dict(sndwnd=128, rcvwnd=128, nodelay=1, interval=10, resend=2, nocwnd=1)
    settings.update(kw)
    return OurEndpoint(KcpEngine(CONV, stream=stream, **settings))


def messages(seed: int, count: int, biggest: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 1376, 1377, biggest] + [rng.randrange(1, biggest) for _ in range(count)]
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.parametrize("package", ["aiokcp", "kcp"])
@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_messages_ours_to_reference(package, loss):
    ref = RefEndpoint(package, CONV, **REF_FAST)
    pair = UdpPair(ours(), ref, loss=loss, seed=11)
    try:
        sent = messages(1, 60, 100 * 1376)  # up to 100 fragments
        for m in sent:
            pair.ours.send(m)
        pair.run_until(lambda: len(pair.got_ref) >= len(sent))
        assert pair.got_ref == sent
        pair.run_until(lambda: pair.ours.engine.waitsnd == 0)
    finally:
        pair.close()


@pytest.mark.parametrize("package", ["aiokcp", "kcp"])
@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_messages_reference_to_ours(package, loss):
    ref = RefEndpoint(package, CONV, **REF_FAST)
    pair = UdpPair(ours(), ref, loss=loss, seed=12)
    try:
        sent = [m for m in messages(2, 60, 100 * 1376) if m or package == "aiokcp"]
        for m in sent:  # (the kcp package refuses to send an empty message)
            pair.ref.send(m)
        pair.run_until(lambda: len(pair.got_ours) >= len(sent))
        assert pair.got_ours == sent
        stats = pair.ours.engine.stats()
        assert stats["dropped_malformed"] == 0
        if loss:
            assert stats["duplicates"] > 0 or pair.sent["ref"] > stats["in_datagrams"]
    finally:
        pair.close()


@pytest.mark.parametrize("package", ["aiokcp", "kcp"])
def test_both_directions_at_once_stream_mode_against_message_mode(package):
    ref = RefEndpoint(package, CONV, **REF_FAST)
    pair = UdpPair(ours(stream=True), ref, loss=0.1, seed=13)
    try:
        rng = random.Random(5)
        to_ref = rng.randbytes(1 << 20)
        to_ours = [m for m in messages(3, 200, 20_000) if m]
        for i in range(0, len(to_ref), 7000):
            pair.ours.send(to_ref[i : i + 7000])
        for m in to_ours:
            pair.ref.send(m)
        total = sum(map(len, to_ours))
        pair.run_until(
            lambda: (
                sum(map(len, pair.got_ref)) >= len(to_ref) and sum(map(len, pair.got_ours)) >= total
            )
        )
        # our stream-mode segments arrive at the reference as a sequence of whole segments
        assert b"".join(pair.got_ref) == to_ref
        assert max(map(len, pair.got_ref)) <= 1376
        assert b"".join(pair.got_ours) == b"".join(to_ours)
    finally:
        pair.close()


def test_our_receive_window_stalls_the_reference_sender_and_wins_reopens_it():
    ref = RefEndpoint("aiokcp", CONV, **REF_FAST)

    class Paused(OurEndpoint):
        reading = False

        def received(self):
            return super().received() if self.reading else []

    mine = Paused(KcpEngine(CONV, stream=True, rcvwnd=16, nodelay=1, interval=10, resend=2))
    pair = UdpPair(mine, ref, seed=14)
    try:
        data = random.Random(6).randbytes(200 * 1376)
        for i in range(0, len(data), 50 * 1376):
            pair.ref.send(data[i : i + 50 * 1376])
        pair.run_until(lambda: mine.engine.stats()["rcv_queue"] == 16)
        for _ in range(20):
            pair.step()
        sent = pair.sent["ref"]
        for _ in range(100):  # ~0.1 s: the reference must hold back (our window is 0)
            pair.step()
        assert pair.sent["ref"] - sent <= 2
        assert mine.engine.stats()["rcv_queue"] == 16
        assert mine.engine.stats()["rcv_buf"] <= 16
        assert ref.kcp.get_waitsnd() >= 200 - 32
        mine.reading = True  # reading reopens the window; a WINS tells the reference
        pair.run_until(lambda: sum(map(len, pair.got_ours)) >= len(data))
        assert b"".join(pair.got_ours) == data
    finally:
        pair.close()


def test_reference_answers_our_window_probe():
    """Our sender facing a full reference receiver probes with WASK; the reference's WINS
    (or any segment) carries its window, and the transfer completes once it reads."""
    ref = RefEndpoint("aiokcp", CONV, **{**REF_FAST, "receive_window_size": 128})
    mine = ours(stream=False, sndwnd=256)
    pair = UdpPair(mine, ref, seed=15)
    pair.ref_reading = False
    try:
        sent = [bytes([i]) * 1000 for i in range(200)]
        for m in sent:
            pair.ours.send(m)
        pair.run_until(lambda: mine.engine.stats()["rmt_wnd"] == 0)
        engine = mine.engine
        probe_at = engine.check(now_ms())
        assert probe_at is not None
        pair.run_until(lambda: engine.stats()["window_probes"] >= 1, seconds=15)
        assert 83 in pair.commands["ours"]  # WASK on the wire
        pair.run_until(lambda: 84 in pair.commands["ref"], seconds=1)  # the reference's WINS
        pair.ref_reading = True
        pair.run_until(lambda: len(pair.got_ref) >= len(sent))
        assert pair.got_ref == sent
    finally:
        pair.close()
