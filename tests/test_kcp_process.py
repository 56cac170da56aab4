"""A kcp server in its own process survives hostile and broken clients (issue 15, item 1).

Also what a hostile peer can cost such a server, and how soon it notices a dead peer.

A failed notify used to leave a cffi export of the frame decoder's buffer alive in a frame
kept by its traceback; when the cyclic GC cleared that memoryview before the export, the
server died with SIGSEGV after about ten such connections. Run against both the C and the
pure-Python frame decoders in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import struct
import subprocess
import sys
import time

import pytest

import polyrpc
from polyrpc.transports.kcp import engine as kcp_engine

pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from tests.kcp_process import ServerProcess  # noqa: E402

ROUNDS = 40


@pytest.fixture(params=[False, True], ids=["c-decoder", "pure-python"])
def server(request):
    with ServerProcess(pure=request.param) as proc:
        yield proc


async def assert_serving(server: ServerProcess) -> None:
    """The process runs, never crashed, and answers a fresh client."""
    assert server.alive(), f"server died ({server.proc.returncode}): {server.stderr()[-3000:]}"
    async with polyrpc.connect(server.url) as client:
        assert await asyncio.wait_for(client.call("Demo.add", 20, 22), 10) == 42
    assert "Fatal Python error" not in server.stderr()
    assert "exported buffer" not in server.stderr()


async def test_bad_notifies_then_a_call_on_many_connections(server):
    for _ in range(ROUNDS):
        async with polyrpc.connect(server.url) as client:
            await client.notify("Demo.add", 1)  # too few arguments: dropped, logged
            assert await asyncio.wait_for(client.call("Demo.add", 1, 2), 10) == 3
        gc.collect()
    await assert_serving(server)


async def test_many_bad_notifies_on_one_connection(server):
    async with polyrpc.connect(server.url) as client:
        for i in range(ROUNDS * 10):
            await client.notify("Demo.add", i)
            if i % 50 == 0:
                assert await asyncio.wait_for(client.call("Demo.add", i, 1), 10) == i + 1
        await client.notify("Demo.nope", 1)
    await assert_serving(server)


async def test_bad_calls_on_many_connections(server):
    for _ in range(ROUNDS):
        async with polyrpc.connect(server.url) as client:
            with pytest.raises(polyrpc.RemoteError) as info:
                await asyncio.wait_for(client.call("Demo.add", 1), 10)
            assert info.value.code == "bad_arguments"
            with pytest.raises(polyrpc.RemoteError) as info:
                await asyncio.wait_for(client.call("Demo.add", 1, "x"), 10)
            assert info.value.code == "handler_error"
    await assert_serving(server)


async def test_clients_aborted_mid_call(server):
    for i in range(ROUNDS):
        client = await polyrpc.connect(server.url)
        await client.notify("Demo.add", 1)
        pending = asyncio.ensure_future(client.call("Demo.sleep", 5))
        await asyncio.sleep(0.01 * (i % 3))
        client.abort()
        with pytest.raises(polyrpc.ConnectionLost):
            await asyncio.wait_for(pending, 10)
    await assert_serving(server)


# -- what a peer can cost (issue 14, item 2) -----------------------------------------

HEADER = struct.Struct("<IBBHIIII")  # conv cmd frg wnd ts sn una len
MAGIC, SYN, SYNACK, COOKIE = 0x50524B31, 0xC0, 0xC1, 0xC5


def raw_handshakes(port: int, count: int) -> list[socket.socket]:
    """``count`` KCP sessions opened by hand (SYN, COOKIE, SYN + cookie, SYNACK) that then
    say nothing: accepted connections still in the handshake."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        conv = random.getrandbits(32) | 1
        sock.send(HEADER.pack(conv, SYN, 0, 0, 0, 0, MAGIC, 0))
        cookie = HEADER.unpack(sock.recv(64))
        assert cookie[1] == COOKIE, cookie
        sock.send(HEADER.pack(conv, SYN, 0, 0, cookie[4], cookie[5], MAGIC, 0))
        assert HEADER.unpack(sock.recv(64))[1] == SYNACK
        socks.append(sock)
    return socks


async def settled_rss(server: ServerProcess) -> int:
    """The server's RSS once it has handled what was sent (KiB)."""
    await asyncio.sleep(0.5)
    return server.rss_kib()


async def test_a_syn_flood_costs_the_server_nothing(server):
    before = await settled_rss(server)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    for i in range(2000):  # 50 source ports, a fresh conv each: like spoofed addresses
        syn = HEADER.pack(random.getrandbits(32) | 1, SYN, 0, 0, 0, 0, MAGIC, 0)
        senders[i % 50].sendto(syn, ("127.0.0.1", server.port))
        if i % 100 == 99:
            await asyncio.sleep(0.005)
    after = await settled_rss(server)
    print(f"kcp SYN flood: 2000 SYNs, server RSS {before} -> {after} KiB")
    answers = 0
    for sock in senders:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while HEADER.unpack(sock.recv(64))[1] == COOKIE:
                answers += 1
        sock.close()
    assert answers > 1000  # answered (statelessly), not ignored
    assert after - before < 1024  # was +790 MiB with a session per SYN
    await assert_serving(server)


async def test_silent_accepted_connections_cost_a_polyrpc_server(server):
    """The whole server (transport, session, frame decoder) per connection before HELLO.
    The transport's part is small (next test); the rest is the session's receive buffer."""
    before = await settled_rss(server)
    socks = raw_handshakes(server.port, 100)  # below the server's max_handshaking (128)
    after = await settled_rss(server)
    per = (after - before) / len(socks)
    print(f"polyrpc kcp server: 100 connections before HELLO, {per:.1f} KiB each")
    assert per < 300
    await assert_serving(server)
    for sock in socks:
        sock.close()


async def test_silent_accepted_connections_cost_the_transport_little():
    with ServerProcess(bare=True) as server:
        before = await settled_rss(server)
        socks = raw_handshakes(server.port, 400)
        after = await settled_rss(server)
        per = (after - before) / len(socks)
        print(f"kcp transport: 400 silent connections, {per:.1f} KiB each")
        assert per < 16
        assert server.alive()
        for sock in socks:
            sock.close()


# -- a dead peer is noticed at once (issue 15, item 5) -------------------------------


async def test_server_killed_pending_call_fails_within_two_seconds():
    with ServerProcess() as server:
        client = await polyrpc.connect(server.url)
        assert await client.call("Demo.add", 1, 2) == 3
        pending = asyncio.ensure_future(client.call("Demo.sleep", 60))
        await asyncio.sleep(0.3)
        server.kill()
        started = time.monotonic()
        with pytest.raises(polyrpc.ConnectionLost):
            await asyncio.wait_for(pending, 10)
        elapsed = time.monotonic() - started
        print(f"kcp: server killed, pending call failed after {elapsed:.2f}s")
        assert elapsed < 3  # the keepalive (1 s) draws an ICMP port unreachable
        client.abort()


CLIENT = """
import asyncio, sys
import polyrpc

async def main():
    client = await polyrpc.connect(sys.argv[1])
    print("calling", flush=True)
    await client.call("Demo.sleep", 60)

asyncio.run(main())
"""


async def test_client_killed_mid_call_the_server_drops_it_within_two_seconds():
    with ServerProcess() as server:
        observer = await polyrpc.connect(server.url)
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "calling\n"
            await asyncio.sleep(0.3)
            assert (await observer.call("_sys.stats"))["connections"] == 2
            child.kill()
            child.wait()
            started = time.monotonic()
            while (await observer.call("_sys.stats"))["connections"] > 1:
                assert time.monotonic() - started < 10, "the server kept the dead client"
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        print(f"kcp: client killed, server dropped it after {elapsed:.2f}s")
        assert elapsed < 3
        await observer.close()
