"""Hostile byte-stream peers (tcp, unix, tls) against a real ``polyrpc serve`` subprocess,
with the C and the pure-Python decoder: the server's RSS stays bounded, the bad peer is
told why (an ERROR frame) or closed, and other clients are served meanwhile (see
docs/architecture.md, "What a peer can cost you")."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import pytest

import polyrpc
from bench import budgets
from polyrpc.rpc.endpoints import MAX_HANDSHAKING
from polyrpc.wire.frames import HEADER, MAGIC, VERSION, Kind, encode_frame
from tests.adversarial.peers import RSS_SLACK, STREAMS, MiB, Raw, error_codes
from tests.test_conformance import error_frames

streams = pytest.mark.parametrize("over", STREAMS)


async def closed_within(peer: Raw, seconds: float) -> bytes | None:
    """What the server sent before closing ``peer``, or None if it is still open."""
    with contextlib.suppress(TimeoutError):
        return await peer.until_closed(seconds)
    return None


@streams
async def test_idle_handshaking_connections_are_capped_and_cheap(target, over):
    before = target.start_peak()
    opened = MAX_HANDSHAKING + 32  # few enough to open well inside the 10 s handshake timeout
    peers = [await Raw.open(target, over) for _ in range(opened)]
    try:
        outcomes = await asyncio.gather(*(closed_within(p, 1.5) for p in peers))
        refused = [data for data in outcomes if data is not None]
        assert len(refused) == opened - MAX_HANDSHAKING
        assert all(error_codes(data) == ["too_many_handshakes"] for data in refused)
        cost = (
            target.growth(before, f"{MAX_HANDSHAKING} {over} handshaking connections")
            / MAX_HANDSHAKING
        )
        print(f"{over}: {cost / 1024:.1f} KiB per handshaking connection")
        assert cost < (128 << 10) * RSS_SLACK  # target 64 KiB (it was ~530 KiB)
    finally:
        for peer in peers:
            peer.close()


async def test_a_hello_never_finished_is_closed_at_the_handshake_timeout(target):
    """Half a HELLO, or a HELLO trickled a byte every 0.3 s (it would take over 20 s): the
    handshake timeout (10 s) closes both, progress or not."""
    stalled = [await Raw.open(target, over) for over in STREAMS]
    trickling = [await Raw.open(target, over) for over in STREAMS]

    async def trickle(peer: Raw) -> None:
        with contextlib.suppress(ConnectionError):
            for byte in budgets.hello():
                await peer.send(bytes([byte]))
                await asyncio.sleep(0.3)

    senders = [asyncio.ensure_future(trickle(peer)) for peer in trickling]
    try:
        for peer in stalled:
            await peer.send(budgets.hello()[:10])
        await target.serves()
        peers = stalled + trickling
        outcomes = await asyncio.gather(*(closed_within(p, 13) for p in peers))  # 10 s + slack
        assert None not in outcomes
    finally:
        for sender in senders:
            sender.cancel()
        for peer in stalled + trickling:
            peer.close()


@streams
async def test_a_huge_frame_announced_before_hello_is_refused_at_its_header(target, over):
    before = target.start_peak()
    peers = [await Raw.open(target, over) for _ in range(8)]
    try:
        for peer in peers:
            await peer.send(budgets.header(64 * MiB - 64) + bytes(16 << 10))
        for peer in peers:
            bodies = error_frames(await peer.until_closed())
            assert [b["code"] for b in bodies] == ["protocol_error"]
            assert "before the handshake" in bodies[0]["message"]
        assert (
            target.growth(before, f"8 {over} headers of 64 MiB before HELLO") < 16 * MiB * RSS_SLACK
        )  # it was 8 x 64 MiB
    finally:
        for peer in peers:
            peer.close()


@streams
async def test_a_huge_frame_trickled_after_hello_costs_only_what_arrived(target, over):
    before = target.start_peak()
    peers = [await Raw.open(target, over, handshake=True) for _ in range(8)]
    try:
        for peer in peers:
            await peer.send(budgets.header(64 * MiB - 64))
        for _ in range(32):  # 8 x 512 KiB in small pieces
            for peer in peers:
                await peer.send(bytes(16 << 10))
            await asyncio.sleep(0.02)
        await target.serves(over)
        assert (
            target.growth(before, f"8 {over} 64 MiB frames trickled after HELLO")
            < 32 * MiB * RSS_SLACK
        )  # not 8 x 64 MiB
    finally:
        for peer in peers:
            peer.close()


def _header(magic: bytes = MAGIC, version: int = VERSION, kind: int = Kind.ONEWAY) -> bytes:
    return HEADER.pack(magic, version, kind, 0, 0, 0, 1, 0, 0)


GARBAGE = {
    "random bytes": bytes(range(7, 250, 3)) * 4,
    "bad magic": _header(magic=b"XX"),
    "bad version": _header(version=VERSION + 1),
    "unknown kind": _header(kind=200),
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(80),
}


@streams
@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_is_answered_with_a_protocol_error_and_a_close(target, over, garbage):
    peer = await Raw.open(target, over)
    try:
        await peer.send(garbage)
        assert error_codes(await peer.until_closed()) == ["protocol_error"]
    finally:
        peer.close()


_BEFORE_HELLO = [Kind.RESPONSE, Kind.ERROR, Kind.REQUEST, Kind.ONEWAY, Kind.HEARTBEAT]
_BEFORE_HELLO += [Kind.CANCEL, Kind.STREAM_ITEM, Kind.CREDIT, Kind.GOAWAY]


@streams
async def test_any_frame_but_hello_first_is_named_and_closed(target, over):
    for kind in _BEFORE_HELLO:
        peer = await Raw.open(target, over)
        try:
            await peer.send(b"".join(encode_frame(kind, 3, b"\xc0", codec=1)))
            bodies = error_frames(await peer.until_closed())
            assert [(b["code"], b["message"]) for b in bodies] == [
                ("protocol_error", f"{kind.name} before HELLO")
            ]
        finally:
            peer.close()


@streams
async def test_a_second_hello_or_an_oversize_frame_after_hello_is_named(target, over):
    for data, words in ((budgets.hello(), "HELLO received twice"), (budgets.header(65 * MiB), "")):
        peer = await Raw.open(target, over, handshake=True)
        try:
            await peer.send(data)
            bodies = error_frames(await peer.until_closed())
            assert [b["code"] for b in bodies] == ["protocol_error"]
            assert words in bodies[0]["message"]
            assert str(bodies[0]["max_frame"]) in bodies[0]["message"] or words
        finally:
            peer.close()


async def test_a_notification_flood_to_a_slow_handler_is_held_back(target):
    before = target.start_peak()
    async with polyrpc.connect(target.urls["tcp"]) as client:
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for sent in range(400):  # noqa: B007 (counted for the report)
                await client.notify("Slow.wait", 5, b"n" * MiB)

        sender = asyncio.ensure_future(flood())
        await asyncio.wait([sender], timeout=4)
        print(f"\n{sent} notifications of 1 MiB sent before the server stopped reading")
        await target.serves("tcp")
        assert (
            target.growth(before, "1 MiB notifications to a slow handler") < 300 * MiB * RSS_SLACK
        )  # it was +776 MiB
        sender.cancel()
        client.abort()


async def test_a_peer_that_never_reads_its_replies_stops_being_served(target):
    before = target.start_peak()
    peer = await Raw.open(target, "tcp", handshake=True)
    try:
        sent = 0
        arg = b"r" * (256 << 10)
        with contextlib.suppress(TimeoutError):
            for seq in range(1, 2001, 2):  # up to 250 MiB of echo calls, replies never read
                peer.writer.writelines(encode_frame(Kind.REQUEST, seq, arg, method="Demo.echo"))
                await asyncio.wait_for(peer.writer.drain(), 2)
                sent += 1
        await asyncio.sleep(1)
        print(f"{sent} calls of 256 KiB written before the server stopped reading")
        await target.serves("tcp")
        assert (
            target.growth(before, "pipelined 256 KiB echo calls, replies unread")
            < 300 * MiB * RSS_SLACK
        )  # it was +922 MiB
    finally:
        peer.close()


@streams
async def test_peers_that_vanish_in_the_middle_of_calls_are_freed(target, over):
    """300 peers each start a slow call and a second call's half frame, then reset."""
    call = b"".join(
        encode_frame(Kind.REQUEST, 1, msgpack.packb([[5], {}]), method="Slow.wait", codec=1)
    )
    half = budgets.header(1 << 20) + bytes(1000)
    before = target.start_peak()
    for _ in range(300):
        peer = await Raw.open(target, over, handshake=True)
        await peer.send(call + half)
        peer.close()
    await target.serves(over)
    assert target.growth(before, f"300 {over} peers reset mid-call") < 16 * MiB * RSS_SLACK


AMPLIFIERS = {  # 3 MiB that a naive decoder turns into millions of objects; must it be refused?
    "msgpack": ([{}] * (3 * MiB), True),  # over the 32 x N container bound: refused
    "json": ([{}] * MiB, False),  # about 25 x N (docs/architecture.md): decoding may finish
}


@pytest.mark.parametrize("codec", AMPLIFIERS)
async def test_a_payload_that_would_decode_to_far_more_than_its_size_is_bounded(target, codec):
    """Refused as that call's ``bad_payload`` (or, where within the bound, echoed intact);
    either way the server's memory stays bounded and the connection and others are served."""
    payload, must_refuse = AMPLIFIERS[codec]
    before = target.start_peak()
    async with polyrpc.connect(target.urls["unix"], codec=codec) as client:
        hostile = [
            asyncio.ensure_future(client.call("Demo.echo", payload, timeout=60)) for _ in range(2)
        ]
        await target.serves("tls")  # another peer, meanwhile
        for call in hostile:
            try:
                assert await call == payload
                assert not must_refuse, "decoded a payload over the bound"
            except polyrpc.RemoteError as refused:
                assert refused.code == "bad_payload", refused
        growth = target.growth(before, f"2 calls of 3 MiB {codec} amplifiers")
        assert growth < 200 * MiB * RSS_SLACK  # it was +313 MiB for one
        assert await client.call("Demo.add", 2, 3, timeout=10) == 5  # still serving
