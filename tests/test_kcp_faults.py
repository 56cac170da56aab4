"""Faults: a lossy, reordering, duplicating relay, and hostile datagrams at a kcp listener."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct

import pytest

from polyrpc.transports.kcp import engine as kcp_engine

pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from polyrpc.testing.udp_relay import UdpRelay  # noqa: E402
from tests.kcp_helpers import Collector, Server, dial  # noqa: E402

HEADER = struct.Struct("<IBBHIIII")
MAGIC = 0x50524B31
SYN, SYNACK, COOKIE = 0xC0, 0xC1, 0xC5


async def test_relay_is_seeded_and_deterministic():
    async def run(seed: int) -> list[int]:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sink.setblocking(False)
        got: list[int] = []
        async with UdpRelay(target=sink.getsockname(), loss=0.3, seed=seed) as relay:
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(300):
                sender.sendto(i.to_bytes(2, "big"), relay.address)
                await asyncio.sleep(0)
            await asyncio.sleep(0.1)
            while True:
                try:
                    got.append(int.from_bytes(sink.recv(10), "big"))
                except BlockingIOError:
                    break
            sender.close()
            assert relay.stats["up_dropped"] == 300 - len(got)
        sink.close()
        return got

    first, again, other = await run(5), await run(5), await run(6)
    assert first == again
    assert first != other
    assert 150 < len(first) < 260


async def test_eight_mib_arrive_intact_through_loss_reordering_duplication_and_delay():
    server = Server(Collector)
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3")
    up = random.Random(1).randbytes(8 << 20)
    down = random.Random(2).randbytes(1 << 20)
    async with UdpRelay(
        target=("127.0.0.1", listener.address.port),
        loss=0.1,
        reorder=0.05,
        duplicate=0.05,
        delay=0.002,
        seed=1,
    ) as relay:
        stream, got = await dial(f"kcp@{relay.url_hostport}?mode=fast3")
        got.keep = False
        stream.write([up[:1]])
        await server.accepted.wait()
        peer, peer_stream = server.receivers[0], server.streams[0]
        peer.keep = False
        peer_stream.write([down])
        for i in range(1, len(up), 256 << 10):
            await stream.send([up[i : i + (256 << 10)]])
        await peer.wait_bytes(len(up), timeout=120)
        await got.wait_bytes(len(down), timeout=60)
        assert peer.sha.digest() == hashlib.sha256(up).digest()
        assert got.sha.digest() == hashlib.sha256(down).digest()
        sender, receiver = stream.stats(), peer_stream.stats()
        assert sender["retransmits"] + sender["fast_retransmits"] > 0
        assert receiver["duplicates"] > 0
        assert relay.stats["up_dropped"] > 0 and relay.stats["up_duplicated"] > 0
        assert relay.stats["up_reordered"] > 0 and relay.stats["down_dropped"] > 0
        await stream.close()
    await listener.close()


def header(conv: int, cmd: int, *, frg=0, wnd=128, ts=0, sn=0, una=0, length=0) -> bytes:
    return HEADER.pack(conv, cmd, frg, wnd, ts, sn, una, length)


async def test_hostile_datagrams_are_dropped_and_counted_never_a_crash():
    server = Server(Collector)
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3")
    stream, _ = await dial(listener.url)
    stream.write([b"before"])
    await server.accepted.wait()
    await server.receivers[0].wait_bytes(6)

    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    target = ("127.0.0.1", listener.address.port)
    rng = random.Random(7)
    sent = {"short": 0, "bad_cmd": 0, "unknown": 0, "random": 0}
    for n in range(24):  # truncated headers, every length short of one
        raw.sendto(rng.randbytes(n), target)
        sent["short"] += 1
    for cmd in (0, 80, 85, 200, 255):
        raw.sendto(header(1, cmd), target)
        sent["bad_cmd"] += 1
    for cmd in (81, 82, 83, 84):  # real commands for a conversation nobody opened
        raw.sendto(header(rng.getrandbits(32), cmd, length=3) + b"abc", target)
        sent["unknown"] += 1
    for _ in range(500):
        raw.sendto(rng.randbytes(rng.randrange(24, 1500)), target)
        sent["random"] += 1
    # open a session by hand (the handshake is documented), then attack it
    conv = 0x5EED
    raw.sendto(header(conv, SYN, una=MAGIC), target)

    async def answer(cmd: int) -> tuple[int, ...]:
        """The reply ``cmd`` for ``conv``, past the answers to the strangers: RST, FINACK to
        random "FIN"s (C sends cookies at once, Python the others after the poll)."""
        while True:
            reply = HEADER.unpack(await asyncio.wait_for(loop.sock_recv(raw, 100), 2))
            if reply[:2] == (conv, cmd):
                return reply
            assert reply[1] in (0xC3, 0xC4, COOKIE)

    cookie = await answer(COOKIE)
    assert cookie[6] == MAGIC
    raw.sendto(header(conv, SYN, ts=cookie[4], sn=cookie[5], una=MAGIC), target)
    assert (await answer(SYNACK))[6] == MAGIC
    malformed = [
        header(conv, 81, length=0xFFFFFFFF) + b"abs",  # absurd length
        header(conv, 81, length=100) + b"short",  # truncated payload
        header(conv, 82, una=10_000),  # acknowledges data never sent
        header(conv, 81, length=1) + b"x" + b"\x00" * 5,  # trailing junk
    ]
    for d in malformed:
        raw.sendto(d, target)
    raw.sendto(header(conv, 81, sn=0, length=5) + b"valid", target)
    await asyncio.wait_for(server.accepted.wait(), 2)
    await asyncio.sleep(0.2)
    stats = listener.stats()
    assert stats["dropped_short"] == sent["short"]
    assert stats["dropped_bad_cmd"] >= sent["bad_cmd"]
    assert stats["dropped_unknown"] >= sent["unknown"]
    assert stats["dropped_malformed"] == len(malformed)
    assert stats["resets_sent"] >= 1
    assert (
        stats["dropped_short"] + stats["dropped_bad_cmd"] + stats["dropped_unknown"]
        >= sum(sent.values()) - 10  # random bytes may look like control datagrams
    )
    hand_made = server.receivers[-1]
    await hand_made.wait_bytes(5)
    assert bytes(hand_made.data) == b"valid"
    # the real session never noticed
    stream.write([b"after"])
    await server.receivers[0].wait_bytes(11)
    assert bytes(server.receivers[0].data) == b"beforeafter"
    raw.close()
    await stream.close()
    await listener.close()
