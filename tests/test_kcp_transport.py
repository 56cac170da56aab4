"""The kcp transport over real loopback UDP: streams, handshake, close, backpressure, timeouts."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time

import pytest

from polyrpc.errors import ConnectFailed, ConnectionLost, ConnectTimeout, InvalidAddress
from polyrpc.stream.registry import registry
from polyrpc.stream.trait import BufferedReceiver
from polyrpc.transports.kcp import engine as kcp_engine

pytestmark = pytest.mark.skipif(
    kcp_engine.unavailable_reason() is not None, reason=str(kcp_engine.unavailable_reason())
)

from polyrpc.testing.udp_relay import UdpRelay  # noqa: E402
from tests.kcp_helpers import Collector, Echo, Server, dial  # noqa: E402

FAST = "mode=fast3"


async def test_echo_roundtrip_and_extra_info():
    server = Server(Echo)
    listener = await server.start()
    stream, got = await dial(f"{listener.url}?{FAST}")
    payload = os.urandom(100_000)
    stream.write([payload[:10], payload[10:]])
    await got.wait_bytes(len(payload))
    assert bytes(got.data) == payload
    assert stream.get_extra_info("transport") == "kcp"
    assert stream.get_extra_info("peer") == ("127.0.0.1", listener.address.port)
    assert stream.get_extra_info("mtu") == 1400
    assert stream.get_extra_info("mode") == "fast3"
    assert server.streams[0].get_extra_info("peer") == stream.get_extra_info("local")
    await stream.close()
    await listener.close()


def test_url_options_are_checked():
    transport = registry.get("kcp")
    with pytest.raises(InvalidAddress, match="fast3"):
        transport.parse("kcp@127.0.0.1:9?mode=turbo")
    with pytest.raises(InvalidAddress, match="mtu"):
        transport.parse("kcp@127.0.0.1:9?mtu=20")
    with pytest.raises(InvalidAddress, match="valid options: backlog, keepalive, mode, mtu"):
        transport.parse("kcp@127.0.0.1:9?window=3")
    with pytest.raises(InvalidAddress, match="backlog"):
        transport.parse("kcp@127.0.0.1:9?backlog=0")
    opts = transport.parse_options(transport.parse("kcp@h:1?mode=normal&sndwnd=64&timeout=2.5"))
    assert opts == {
        "mode": "normal",
        "mtu": 1400,
        "reuse_port": False,
        "sndwnd": 64,
        "rcvwnd": 512,
        "timeout": 2.5,
        "keepalive": 1.0,
        "backlog": 512,
    }


@pytest.mark.parametrize("mode", ["normal", "fast", "fast2", "fast3"])
async def test_every_mode_and_a_small_mtu_carry_data(mode):
    server = Server(Echo)
    listener = await server.start(f"kcp@127.0.0.1:0?mode={mode}&mtu=300")
    stream, got = await dial(f"{listener.url}?mode={mode}&mtu=300")
    payload = os.urandom(300_000)
    stream.write([payload])
    await got.wait_bytes(len(payload))
    assert bytes(got.data) == payload
    await stream.close()
    await listener.close()


async def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = Server(Echo)
    try:
        listener = await server.start("kcp@[::1]:0")
    except ConnectFailed as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    stream, got = await dial(listener.url)
    stream.write([b"over six"])
    await got.wait_bytes(8)
    assert stream.get_extra_info("peer")[0] == "::1"
    await stream.close()
    await listener.close()


async def test_close_delivers_everything_then_eof_then_connection_lost():
    server = Server()
    listener = await server.start()
    stream, got = await dial(listener.url)
    payload = os.urandom(2_000_000)
    stream.write([payload])
    started = time.monotonic()
    await stream.close()  # returns once the peer has acknowledged every byte
    assert time.monotonic() - started < 2
    peer = server.receivers[0]
    await asyncio.wait_for(peer.lost.wait(), 5)
    assert bytes(peer.data) == payload
    assert peer.eof.is_set()
    assert isinstance(peer.lost_exc, ConnectionLost)
    assert got.lost.is_set() and got.lost_exc is None
    with pytest.raises(ConnectionLost):
        stream.write([b"late"])
    with pytest.raises(ConnectionLost):
        server.streams[0].write([b"late"])
    await listener.close()


async def test_write_eof_half_closes_one_direction():
    server = Server()
    listener = await server.start()
    stream, got = await dial(listener.url)
    stream.write([b"question"])
    stream.write_eof()
    await server.accepted.wait()
    peer, peer_stream = server.receivers[0], server.streams[0]
    await asyncio.wait_for(peer.eof.wait(), 5)
    assert bytes(peer.data) == b"question"
    with pytest.raises(ConnectionLost):
        stream.write([b"more"])
    peer_stream.write([b"answer"])  # the other direction still works
    await got.wait_bytes(6)
    assert bytes(got.data) == b"answer"
    started = time.monotonic()
    await peer_stream.close()
    assert time.monotonic() - started < 1  # acknowledged, not aborted after a timeout
    await asyncio.wait_for(got.lost.wait(), 5)
    assert got.eof.is_set()
    await listener.close()


async def test_abort_resets_the_peer():
    server = Server()
    listener = await server.start()
    stream, _ = await dial(listener.url)
    stream.write([b"x" * 10])
    await server.accepted.wait()
    stream.abort()
    peer = server.receivers[0]
    await asyncio.wait_for(peer.lost.wait(), 5)
    assert isinstance(peer.lost_exc, ConnectionLost)
    assert "reset" in str(peer.lost_exc)
    await listener.close()


async def test_peer_closing_first_while_we_write_is_clean_for_both():
    server = Server(Echo)
    listener = await server.start()
    stream, got = await dial(listener.url)
    stream.write([b"ping"])
    await got.wait_bytes(4)
    started = time.monotonic()
    await server.streams[0].close()
    assert time.monotonic() - started < 1
    await asyncio.wait_for(got.lost.wait(), 5)
    assert got.eof.is_set() and isinstance(got.lost_exc, ConnectionLost)
    await stream.close()  # idempotent after the loss
    await listener.close()


async def test_dial_refused_when_nothing_listens():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    started = time.monotonic()
    with pytest.raises(ConnectFailed, match="refused"):
        await dial(f"kcp@127.0.0.1:{port}")
    assert time.monotonic() - started < 2


async def test_dial_times_out_against_a_silent_socket():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ConnectTimeout, match="no kcp answer"):
            await dial(f"kcp@127.0.0.1:{silent.getsockname()[1]}?timeout=0.6")
        assert len(silent.recv(100)) == 24  # it did send SYNs
    finally:
        silent.close()


async def test_closed_listener_refuses_new_streams_but_keeps_old_ones():
    server = Server(Echo)
    listener = await server.start()
    stream, got = await dial(listener.url)
    await listener.close()
    with pytest.raises(ConnectFailed, match="refused"):
        await dial(listener.url)
    stream.write([b"still here"])
    await got.wait_bytes(10)
    await stream.close()
    await asyncio.sleep(0.05)
    assert listener.mux.closed  # the socket went away with its last session


async def test_backpressure_pause_reading_stalls_the_writer():
    server = Server()
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3&rcvwnd=64")
    stream, _ = await dial(f"{listener.url}?{FAST}&sndwnd=64")
    stream.write([b"hello"])
    await server.accepted.wait()
    peer, peer_stream = server.receivers[0], server.streams[0]
    await peer.wait_bytes(5)
    peer_stream.pause_reading()
    chunk = os.urandom(64 << 10)
    written = 0
    while not stream.writing_paused:
        stream.write([chunk])
        written += len(chunk)
    assert stream.write_buffer_size > stream.high_water
    drained = asyncio.ensure_future(stream.drain())
    await asyncio.sleep(0.3)
    assert not drained.done()  # the reader does not read, so the writer waits
    assert peer.received == 5
    assert peer_stream.stats()["rcv_queue"] == 64  # its receive window is full and closed
    assert stream.stats()["rmt_wnd"] == 0
    queued = stream.write_buffer_size
    assert queued > written - 64 * 1376 * 2  # bounded: almost everything is still ours
    peer_stream.resume_reading()
    await asyncio.wait_for(drained, 10)
    await peer.wait_bytes(5 + written)
    await stream.close()
    await listener.close()


async def test_idle_peer_ends_in_connection_lost():
    server = Server(Echo)
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3&timeout=1")
    async with UdpRelay(target=("127.0.0.1", listener.address.port), seed=3) as relay:
        stream, got = await dial(f"kcp@{relay.url_hostport}?mode=fast3&timeout=1")
        stream.write([b"hi"])
        await got.wait_bytes(2)
        await asyncio.sleep(1.5)  # keepalives keep an idle but healthy link up
        assert not got.lost.is_set()
        relay.loss = 1.0  # the network goes dark
        started = time.monotonic()
        await asyncio.wait_for(got.lost.wait(), 5)
        assert isinstance(got.lost_exc, ConnectionLost)
        assert "idle timeout" in str(got.lost_exc)
        assert 0.5 < time.monotonic() - started < 3
        peer = server.receivers[0]
        await asyncio.wait_for(peer.lost.wait(), 5)
        assert isinstance(peer.lost_exc, ConnectionLost)
        with pytest.raises(ConnectionLost):
            await stream.drain()
    await listener.close()


async def test_ten_thousand_open_close_cycles_do_not_grow_state():
    server = Server(Echo, keep=False)
    listener = await server.start()
    url = listener.url + "?" + FAST

    async def cycle() -> None:
        stream, got = await dial(url)
        stream.write([b"."])
        await got.wait_bytes(1)
        await stream.close()

    async def batch(n: int) -> None:
        await asyncio.gather(*(cycle() for _ in range(n)))

    await batch(200)  # warm up pools and caches
    await asyncio.sleep(0.1)
    gc.collect()
    segments_before = kcp_engine.live_segments()
    objects_before = len(gc.get_objects())
    for _ in range(50):
        await batch(200)
    await asyncio.sleep(0.2)
    gc.collect()
    assert listener.stats()["sessions"] == 0
    assert not listener.mux.streams
    assert kcp_engine.live_segments() <= segments_before
    assert len(gc.get_objects()) < objects_before + 2000
    assert server.count == 10_200
    await listener.close()
    assert listener.mux.closed


async def test_an_idle_connection_gives_back_its_spare_segments():
    server = Server(Echo)
    listener = await server.start("kcp@127.0.0.1:0?mode=fast3&keepalive=0.2")
    baseline = kcp_engine.live_segments()
    stream, got = await dial(listener.url + "?mode=fast3&keepalive=0.2")
    blob = bytes(1 << 20)
    await stream.send([blob])
    await got.wait_bytes(len(blob))
    busy = kcp_engine.live_segments() - baseline
    assert busy > 100  # both engines pool the segments of the burst
    deadline = time.monotonic() + 5
    while kcp_engine.live_segments() - baseline > 8:  # the keepalive tick drops the pools
        assert time.monotonic() < deadline, kcp_engine.live_segments() - baseline
        await asyncio.sleep(0.05)
    stream.write([b"still works"])
    await got.wait_bytes(len(blob) + 11)
    await stream.close()
    await listener.close()


class BufferedCollector(Collector, BufferedReceiver):
    """A receiver in asyncio's BufferedProtocol shape that hands out small buffers."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self.area = bytearray(1000)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert sizehint > 0
        return memoryview(self.area)[: 1 + len(self.data) % 999]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.area[:nbytes]))


async def test_buffered_receivers_get_bytes_copied_into_their_own_buffers():
    server = Server(BufferedCollector)
    listener = await server.start()
    stream, _ = await dial(listener.url)
    payload = os.urandom(500_000)
    stream.write([payload])
    await server.accepted.wait()
    await server.receivers[0].wait_bytes(len(payload))
    assert bytes(server.receivers[0].data) == payload
    await stream.close()
    await listener.close()


def test_missing_extension_is_a_clear_transport_unavailable():
    """Without the compiled core the transport is listed but says why and how to fix it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "polyrpc.transports.kcp._kcp":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        from polyrpc.errors import TransportUnavailable
        from polyrpc.stream.registry import registry
        try:
            registry.resolve("kcp@127.0.0.1:9000")
        except TransportUnavailable as exc:
            print("UNAVAILABLE", exc)
        row = [r for r in registry.describe() if r.scheme == "kcp"][0]
        print("ROW", row.usable, row.reason)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "UNAVAILABLE kcp: the KCP C extension" in out
    assert "build_ext --inplace" in out
    assert "ROW False" in out


async def test_dial_tries_each_resolved_address_in_turn(monkeypatch):
    server = Server(Echo)
    listener = await server.start("kcp@127.0.0.1:0")
    port = listener.address.port
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.2", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    loop = asyncio.get_running_loop()

    async def two_answers(host, port_, **kwargs):  # a name with a dead first address
        assert host == "twohomed.test"
        dgram, udp = socket.SOCK_DGRAM, socket.IPPROTO_UDP
        return [
            (socket.AF_INET, dgram, udp, "", ("127.0.0.2", dead_port)),
            (socket.AF_INET, dgram, udp, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", two_answers)
    stream, got = await dial(f"kcp@twohomed.test:{port}")
    assert stream.get_extra_info("peer") == ("127.0.0.1", port)
    stream.write([b"second"])
    await got.wait_bytes(6)
    await stream.close()
    await listener.close()


def test_gather_writes_join_small_buffers_and_pass_large_ones_uncopied():
    from polyrpc.transports.kcp.udp import COALESCE_LIMIT, _coalesce

    big = bytearray(COALESCE_LIMIT)
    out = _coalesce([b"a", b"", memoryview(b"bc"), big, b"d", b"ef"])
    assert [bytes(x) for x in out] == [b"abc", bytes(big), b"def"]
    assert out[1] is big
