"""The kcp listener's stateless handshake: a SYN from an unverified address gets a cookie
and nothing else; only a SYN echoing a valid cookie opens a session (issue 14, item 2).

Raw UDP datagrams against a real listener; the wire is documented in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from polyrpc.errors import ConnectFailed
from polyrpc.transports.kcp import engine as kcp_engine

pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from polyrpc.transports.kcp import udp  # noqa: E402
from polyrpc.transports.kcp.engine import ffi, lib  # noqa: E402
from tests.kcp_helpers import Collector, Server, dial  # noqa: E402

HEADER = struct.Struct("<IBBHIIII")  # conv cmd frg wnd ts sn una len
MAGIC = 0x50524B31
SYN, SYNACK, RST, COOKIE = 0xC0, 0xC1, 0xC4, 0xC5


class Raw:
    """A plain UDP socket speaking the handshake by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.target = ("127.0.0.1", port)

    def send(self, conv: int, cmd: int, *, frg=0, ts=0, sn=0, una=MAGIC, data=b"") -> None:
        self.sock.sendto(HEADER.pack(conv, cmd, frg, 0, ts, sn, una, len(data)) + data, self.target)

    async def reply(self, timeout: float = 2.0) -> tuple[int, ...]:
        loop = asyncio.get_running_loop()
        return HEADER.unpack(await asyncio.wait_for(loop.sock_recv(self.sock, 2048), timeout))

    async def reply_for(self, conv: int, timeout: float = 2.0) -> tuple[int, ...]:
        """The next datagram for ``conv``: sessions opened before may send keepalive probes
        meanwhile (a slow machine takes over a second to open many)."""
        async with asyncio.timeout(timeout):
            while (answer := await self.reply(timeout))[0] != conv:
                pass
        return answer

    async def silent(self, wait: float = 0.2) -> bool:
        """True if nothing arrives within ``wait`` seconds."""
        try:
            await self.reply(wait)
        except TimeoutError:
            return True
        return False

    async def cookie(self, conv: int) -> tuple[int, int]:
        """Send a bare SYN; the listener's cookie as (ts, sn)."""
        self.send(conv, SYN)
        answer = await self.reply_for(conv)
        assert answer[:2] == (conv, COOKIE) and answer[6] == MAGIC, answer
        return answer[4], answer[5]

    async def open(self, conv: int) -> None:
        """The whole handshake: SYN, COOKIE, SYN echoing it, SYNACK."""
        ts, sn = await self.cookie(conv)
        self.send(conv, SYN, ts=ts, sn=sn)
        answer = await self.reply_for(conv)
        assert answer[:2] == (conv, SYNACK) and answer[6] == MAGIC, answer

    def close(self) -> None:
        self.sock.close()


def test_siphash_matches_the_reference_vectors():
    key = ffi.new("uint8_t[]", bytes(range(16)))
    # from the SipHash paper (Aumasson & Bernstein), appendix A, and its vector table
    assert lib.kcp_siphash24(key, bytes(range(15)), 15) == 0xA129CA6149BE45E5
    assert lib.kcp_siphash24(key, b"", 0) == 0x726FDB47DD0E0E31
    assert lib.kcp_siphash24(key, bytes(range(8)), 8) == 0x93F5F5799A932462


async def test_a_bare_syn_gets_a_cookie_and_no_state():
    server = Server(Collector)
    listener = await server.start()
    raw = Raw(listener.address.port)
    answers = []
    for first in range(1, 1001, 100):  # in rounds: the replies must fit our socket buffer
        for conv in range(first, first + 100):
            raw.send(conv, SYN)
        answers += [await raw.reply() for _ in range(100)]
    assert {a[1] for a in answers} == {COOKIE}
    assert sorted(a[0] for a in answers) == list(range(1, 1001))
    assert len({(a[4], a[5]) for a in answers}) == 1000  # one per conv
    stats = listener.stats()
    assert stats["sessions"] == 0 and stats["cookies_sent"] == 1000
    assert server.count == 0
    raw.close()
    await listener.close()


async def test_only_the_echoed_cookie_for_the_same_address_and_conv_opens_a_session():
    server = Server(Collector)
    listener = await server.start()
    a, b = Raw(listener.address.port), Raw(listener.address.port)
    ts, sn = await a.cookie(7)
    for sender, conv, cookie in (
        (a, 7, (ts, sn ^ 1)),  # wrong cookie
        (a, 8, (ts, sn)),  # another conv
        (b, 7, (ts, sn)),  # another address (port)
    ):
        sender.send(conv, SYN, ts=cookie[0], sn=cookie[1])
        answer = await sender.reply()
        assert answer[1] == COOKIE, answer  # a fresh cookie again, never a session
    assert listener.stats()["sessions"] == 0 and server.count == 0
    a.send(7, SYN, ts=ts, sn=sn, una=0)  # the right cookie without the magic: ignored
    assert await a.silent()
    a.send(7, SYN, ts=ts, sn=sn)
    assert (await a.reply())[1] == SYNACK
    assert listener.stats()["sessions"] == 1
    a.send(7, SYN, ts=ts, sn=sn)  # a repeated SYN (our SYNACK was lost) is answered again
    assert (await a.reply())[1] == SYNACK
    assert listener.stats()["sessions"] == 1 and listener.stats()["cookies_accepted"] == 1
    a.close()
    b.close()
    await listener.close()


async def test_cookies_expire_after_two_buckets(monkeypatch):
    monkeypatch.setattr(udp, "COOKIE_BUCKET_MS", 200)
    server = Server(Collector)
    listener = await server.start()
    raw = Raw(listener.address.port)
    ts, sn = await raw.cookie(9)
    await asyncio.sleep(0.45)  # two buckets later: this secret is gone
    raw.send(9, SYN, ts=ts, sn=sn)
    assert (await raw.reply())[1] == COOKIE
    ts, sn = await raw.cookie(10)
    await asyncio.sleep(0.05)
    raw.send(10, SYN, ts=ts, sn=sn)
    assert (await raw.reply())[1] == SYNACK
    raw.close()
    await listener.close()


async def test_the_dialer_echoes_the_cookie():
    server = Server(Collector)
    listener = await server.start()
    stream, _ = await dial(listener.url)
    stream.write([b"hi"])
    await server.accepted.wait()
    await server.receivers[0].wait_bytes(2)
    stats = listener.stats()
    assert stats["cookies_sent"] == 1 and stats["cookies_accepted"] == 1
    await stream.close()
    await listener.close()


async def test_backlog_caps_silent_connections_and_refuses_clearly():
    server = Server(Collector)
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3&backlog=3")
    raw = Raw(listener.address.port)
    for conv in (1, 2, 3):
        await raw.open(conv)
    ts, sn = await raw.cookie(4)
    raw.send(4, SYN, ts=ts, sn=sn)
    answer = await raw.reply()
    assert answer[:3] == (4, RST, udp.BUSY)  # refused, newest first: frg bit 0 = busy
    with pytest.raises(ConnectFailed, match="busy"):
        await dial(listener.url)
    # one of them speaks: it leaves the handshake and makes room
    raw.send(2, 81, una=0, data=b"hello")
    await server.receivers[1].wait_bytes(5)
    stream, _ = await dial(listener.url)
    await stream.close()
    assert listener.stats()["sessions"] == 3
    raw.close()
    await listener.close()
