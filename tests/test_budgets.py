"""What a peer can cost a server, measured on a real ``polyrpc serve`` subprocess (its RSS
from /proc) with both frame decoders: idle connections, pre-auth partial frames, announced
but unsent payloads, and a hostile msgpack call. The bounds are generous; bench/budgets.py
measures the same numbers (see docs/architecture.md)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

import polyrpc
from polyrpc.wire.frames import ACCELERATED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

_spec = importlib.util.spec_from_file_location(
    "budgets", Path(__file__).parent.parent / "bench" / "budgets.py"
)
assert _spec is not None and _spec.loader is not None
budgets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budgets)

MiB = 1 << 20
decoders = pytest.mark.parametrize(
    "pure",
    [
        pytest.param(True, id="python"),
        pytest.param(False, id="c", marks=pytest.mark.skipif(not ACCELERATED, reason="no C")),
    ],
)


# (transport, the server's event loop, bound per connection); the loop matters for tls
# only: asyncio's own TLS protocol allocated 256 KiB per connection up front, uvloop's does not
transports = pytest.mark.parametrize(
    "transport,loop,bound",
    [
        pytest.param("tcp", "", 100 << 10, id="tcp"),
        pytest.param("tls", "asyncio", 128 << 10, id="tls-asyncio"),
        pytest.param("tls", "", 128 << 10, id="tls"),
        pytest.param("quic", "", 256 << 10, id="quic"),
    ],
)


@transports
def test_a_connection_that_never_sends_hello_is_cheap(transport, loop, bound):
    """Transport handshake done (TCP accept, TLS, QUIC), no HELLO: what it costs the server."""
    cost = budgets.handshaking_connection_cost(100, transport, loop)
    # measured: tcp ~23 KiB, tls ~52 KiB (it was ~308 KiB on asyncio's loop), quic ~94 KiB
    # (~113 KiB while aioquic's spent handshake buffers were kept)
    assert cost < bound


@transports
@decoders
def test_idle_authenticated_connections_are_cheap(pure, transport, loop, bound):
    cost = budgets.idle_connection_cost(200, pure, transport, loop)
    # measured: tcp ~26 KiB (it was ~530 KiB: two 256 KiB buffers), tls ~53 KiB (it was
    # ~308 KiB on asyncio's loop), quic ~110 KiB (it was ~128 KiB)
    assert cost < bound


@decoders
def test_a_peer_that_never_sends_hello_cannot_stage_a_big_frame(pure):
    result = budgets.partial_frame_cost(peers=8, sent=1 << 14, pure_python=pure)
    assert result["closed"] == 8  # refused at the header: over the handshake limit
    assert result["bytes"] < 16 * MiB


@decoders
def test_a_header_alone_cannot_make_the_server_allocate_what_it_announces(pure):
    result = budgets.partial_frame_cost(peers=8, sent=1, handshake=True, pure_python=pure)
    assert result["bytes"] < 16 * MiB  # the pure-Python decoder took 8 x 64 MiB


@decoders
def test_a_call_that_would_decode_to_far_more_than_its_size_fails_alone(pure):
    """3 MiB of empty msgpack maps: a clear bad_payload error for that call, the server's
    RSS bounded, and the connection still serving."""

    async def main(pid: int, url: str) -> tuple[int, polyrpc.RemoteError]:
        before = budgets.rss(pid)
        async with polyrpc.connect(url) as client:
            with pytest.raises(polyrpc.RemoteError) as refused:
                # the same {} 3 Mi times: cheap here, 3 Mi dicts to a naive decoder
                await client.call("Demo.echo", [{}] * (3 * MiB), timeout=60)
            grown = budgets.rss(pid) - before
            assert await client.call("Demo.add", 2, 3, timeout=10) == 5
        return grown, refused.value

    with budgets.demo_server(pure) as (proc, url):
        grown, error = asyncio.run(main(proc.pid, url))
    assert error.code == "bad_payload" and "payload of 3145736 bytes" in str(error)
    assert grown < 200 * MiB  # it was +313 MiB, and the loop stalled for over a second
