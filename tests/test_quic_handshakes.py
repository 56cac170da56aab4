"""quic address validation (stateless Retry) and the cap on connections in the handshake."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from quic_helpers import dial, serving, until

import polyrpc
from polyrpc.errors import ConnectFailed


def client_initials(count: int, port: int, token: bytes = b"") -> list[bytes]:
    """First datagrams (real Initials) of ``count`` aioquic clients that never go further."""
    datagrams = []
    for _ in range(count):
        configuration = QuicConfiguration(
            is_client=True, alpn_protocols=["polyrpc/1"], server_name="localhost"
        )
        configuration.token = token
        connection = QuicConnection(configuration=configuration)
        connection.connect(("127.0.0.1", port), now=time.monotonic())
        datagrams.append(connection.datagrams_to_send(now=time.monotonic())[0][0])
    return datagrams


def send_all(datagrams: list[bytes], port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


async def test_retry_always_validates_then_connects(tmp_path) -> None:
    async with serving(tmp_path, "&retry=always") as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        await client.send([b"hello"])
        _, sink = await server.first()
        await sink.wait_for(5)
        assert server.listener.retries == 1
        await client.close()


async def test_handshaking_connections_are_capped_and_expire(tmp_path) -> None:
    options = "&retry=never&max_handshaking=4&timeout=1"
    async with serving(tmp_path, options) as (server, cert):
        listener = server.listener
        port = listener.address.port
        send_all(client_initials(20, port), port)
        await until(lambda: listener.handshaking + listener.refused >= 20, 10)
        assert listener.handshaking == 4
        assert listener.refused == 16
        # a real client is told why at once (not left to time out)
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match="too many connections are in the handshake"):
            await dial(port, f"ca={cert}&timeout=3")
        assert time.monotonic() - started < 2.0
        # the stuck handshakes expire after ?timeout=, and the slots serve new clients
        await until(lambda: not listener.handshaking, 5, 0.05)
        client = await dial(port, f"ca={cert}")
        await client.close()


async def test_forged_token_is_rejected(tmp_path) -> None:
    async with serving(tmp_path, "&retry=always") as (server, _cert):
        port = server.listener.address.port
        send_all(client_initials(5, port, token=os.urandom(40)), port)
        await until(lambda: server.listener.dropped >= 5, 5)
        assert server.listener.handshaking == 0 and server.listener.retries == 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_flood_of_initials_costs_the_server_nothing() -> None:
    """Spoofed Initials (clients that never answer) against `polyrpc serve` with defaults:
    beyond a few handshakes every one gets a stateless Retry; a real client still gets in."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyrpc.cli", "serve", "quic@127.0.0.1:0", "--demo"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        url = port = None
        for line in proc.stdout:
            if match := re.search(r"clients: (quic@127\.0\.0\.1:(\d+)\S*)", line):
                url, port = match.group(1), int(match.group(2))
            if line.startswith("methods:"):
                break
        assert url is not None and port is not None
        flood = client_initials(400, port)
        await asyncio.sleep(0.5)
        before = _rss(proc.pid)
        for i in range(0, len(flood), 50):
            send_all(flood[i : i + 50], port)
            await asyncio.sleep(0.02)
        started = time.monotonic()
        async with polyrpc.connect(url) as client:
            assert await client.call("Demo.add", 1, 2) == 3
        print(f"a client got through the flood in {time.monotonic() - started:.2f}s")
        await asyncio.sleep(2.0)
        grown = _rss(proc.pid) - before
        print(f"server RSS after 400 spoofed Initials: {grown / 1024:+.0f} KiB")
        # without validation each costs ~100 KiB (400: ~39 MiB); now only a few handshakes do
        assert grown < 8 << 20, grown
    finally:
        proc.kill()
        proc.wait()


async def test_auto_retry_starts_no_later_than_the_cap(tmp_path) -> None:
    async with serving(tmp_path, "&max_handshaking=2&timeout=5") as (server, _cert):
        listener = server.listener
        port = listener.address.port
        send_all(client_initials(10, port), port)
        await until(lambda: listener.handshaking + listener.retries >= 10, 10)
        assert (listener.handshaking, listener.retries, listener.refused) == (2, 8, 0)
