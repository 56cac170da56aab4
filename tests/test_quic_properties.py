"""Property test of the QUIC glue as any host on the network reaches it: arbitrary UDP
datagrams (random bytes, QUIC-shaped long headers, a real client's Initial with bytes
changed) sent to a quic listener never raise out of its datagram handling, and the server
keeps serving real clients."""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyrpc
from polyrpc.stream.registry import registry

try:
    registry.get("quic")
except Exception as exc:  # pragma: no cover - a machine without aioquic
    pytest.skip(f"quic unavailable: {exc}", allow_module_level=True)


def real_initial() -> bytes:
    """The first datagram a real QUIC client sends (an Initial padded to 1200 bytes)."""
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    client.connect(("127.0.0.1", 9), now=0.0)
    return client.datagrams_to_send(now=0.0)[0][0]


INITIAL = real_initial()
long_headers = st.builds(
    lambda first, version, dcid, scid, token, rest: (
        bytes([0xC0 | first])
        + version
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + bytes([len(token)])
        + token
        + rest
    ),
    st.integers(0, 63),
    st.sampled_from([b"\x00\x00\x00\x01", b"\x00\x00\x00\x00", b"\x6b\x33\x43\xcf"])
    | st.binary(min_size=4, max_size=4),
    st.binary(max_size=21),
    st.binary(max_size=21),
    st.binary(max_size=30),
    st.binary(max_size=1300),
)
mutated_initials = st.lists(
    st.tuples(st.integers(0, len(INITIAL) - 1), st.integers(0, 255)), min_size=1, max_size=8
).map(lambda edits: _edit(INITIAL, edits))
datagrams = st.one_of(st.binary(max_size=1500), long_headers, mutated_initials)


def _edit(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos] = value
    return bytes(out)


def test_random_datagrams_never_hurt_a_quic_server():
    loop = asyncio.new_event_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    server = polyrpc.Server()

    class Svc:
        async def echo(self, x):
            return x

    server.register(Svc(), "Svc")
    with tempfile.TemporaryDirectory(prefix="prpc") as workdir:
        transport = registry.get("quic")
        listen_url, client_options = transport.loopback_urls(Path(workdir))
        bound = loop.run_until_complete(server.start(listen_url))
        client_url = str(transport.parse(bound).with_options(**client_options))
        port = int(bound.split("@", 1)[1].split("?")[0].rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(datagrams, min_size=1, max_size=8))
        def send(batch: list[bytes]) -> None:
            for d in batch:
                sock.send(d)
            loop.run_until_complete(asyncio.sleep(0.005))
            assert not errors, errors

        async def served() -> object:
            async with await polyrpc.connect(client_url) as client:
                return await client.call("Svc.echo", struct.pack("<I", 7), timeout=20)

        try:
            send()
            loop.run_until_complete(asyncio.sleep(0.2))
            assert loop.run_until_complete(served()) == struct.pack("<I", 7)
            assert not errors, errors
        finally:
            sock.close()
            loop.run_until_complete(server.close(timeout=2))
            loop.close()
