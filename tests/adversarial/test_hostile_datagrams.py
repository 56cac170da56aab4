"""Hostile UDP datagrams (kcp and quic) against a real ``polyrpc serve`` subprocess, with
the C and the pure-Python decoder: floods of handshakes and garbage cost the server next to
nothing, and a normal client still connects and is served (see docs/architecture.md)."""

from __future__ import annotations

import asyncio
import random
import socket

from polyrpc.transports.kcp.udp import RST
from polyrpc.wire.frames import VERSION
from tests.adversarial.peers import RSS_SLACK, MiB
from tests.test_kcp_handshake import COOKIE, HEADER, MAGIC, SYN
from tests.test_kcp_handshake import Raw as KcpRaw


async def paced(datagrams, send) -> None:
    """Send every datagram, yielding now and then so the socket buffers keep up."""
    for i, datagram in enumerate(datagrams):
        send(datagram)
        if i % 100 == 99:
            await asyncio.sleep(0.005)


async def test_a_kcp_syn_flood_costs_no_state(target):
    port = target.address("kcp")[1]
    flooder = KcpRaw(port)
    before = target.start_peak()
    try:
        for conv in range(1, 5001):
            flooder.send(conv, SYN)
            if conv % 100 == 0:
                await asyncio.sleep(0.005)
        assert (await flooder.reply())[1] == COOKIE  # answered statelessly
        await target.serves("kcp")
        assert target.growth(before, "5000 kcp SYNs") < 8 * MiB * RSS_SLACK  # was +790 MiB/2000
    finally:
        flooder.close()


async def test_validated_kcp_sessions_that_never_speak_cost_little_each(target):
    port = target.address("kcp")[1]
    peer = KcpRaw(port)
    before = target.start_peak()
    try:
        for conv in range(1, 101):  # the whole cookie handshake, then silence
            await peer.open(conv)
        cost = target.growth(before, "100 silent kcp sessions") / 100
        print(f"kcp: {cost / 1024:.1f} KiB per session before HELLO")
        assert cost < (128 << 10) * RSS_SLACK  # target 64 KiB (it was ~255 KiB)
        await target.serves("kcp")
    finally:
        for conv in range(1, 101):
            peer.send(conv, RST, una=0)
        peer.close()


def _kcp_garbage(rng: random.Random) -> list[bytes]:
    """Datagrams a kcp listener must shrug off: noise, truncated and oversized headers,
    data and acks for sessions that do not exist, SYNs without the magic."""
    noise = [rng.randbytes(rng.randrange(1, 1400)) for _ in range(500)]
    headers = [
        HEADER.pack(rng.getrandbits(32), cmd, 0, 128, 0, rng.getrandbits(32), una, length)
        + rng.randbytes(min(length, 1400))
        for cmd, una, length in [(81, 0, 100), (82, 0, 0), (SYN, 0, 0), (SYN, MAGIC, 1 << 30)]
        for _ in range(250)
    ]
    return [*noise, *headers, HEADER.pack(1, 81, 0, 0, 0, 0, 0, 0)[:10], bytes(65000)]


async def test_garbage_kcp_datagrams_are_ignored(target):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    before = target.start_peak()
    try:
        where = target.address("kcp")
        await paced(_kcp_garbage(random.Random(14)), lambda d: sock.sendto(d, where))
        await target.serves("kcp")
        assert target.growth(before, "1500 kcp garbage datagrams") < 8 * MiB * RSS_SLACK
    finally:
        sock.close()


def _quic_initials(rng: random.Random, count: int) -> list[bytes]:
    """Long-header Initial packets (version 1, fresh connection ids) padded to 1200 bytes
    whose protection is noise, plus short-header packets for connections that do not exist
    and packets for an unknown version."""
    initials = []
    for i in range(count):
        dcid, scid = rng.randbytes(8), rng.randbytes(8)
        version = 1 if i % 10 else 0x0A0A0A0A  # every tenth: version negotiation
        head = bytes([0xC3]) + version.to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid
        initials.append(head + b"\x00\x44\xa0" + rng.randbytes(1200 - len(head) - 3))
    shorts = [bytes([0x43]) + rng.randbytes(rng.randrange(20, 1200)) for _ in range(count // 4)]
    return initials + shorts


async def test_a_quic_flood_of_bogus_initials_costs_little(target):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    before = target.start_peak()
    try:
        where = target.address("quic")
        await paced(_quic_initials(random.Random(VERSION), 2000), lambda d: sock.sendto(d, where))
        await target.serves("quic")
        assert target.growth(before, "2500 bogus quic packets") < 16 * MiB * RSS_SLACK
    finally:
        sock.close()
