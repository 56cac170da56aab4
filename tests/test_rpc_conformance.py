"""The RPC behaviours, run over every usable transport (see conftest.usable_transports)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import msgpack
import pytest

import polyrpc
from polyrpc.rpc.connection import STREAM_CREDIT
from polyrpc.wire.frames import HEADER_SIZE, FrameDecoder, Kind, encode_frame
from tests.rpc_fault_services import Slow
from tests.test_conformance import (
    Recorder,
    assert_newcomers_refused,
    error_frames,
    hold_handshakes,
)


class Arith:
    """Arithmetic for tests."""

    async def mul(self, a: int, b: int) -> int:
        """Multiply."""
        return a * b

    def add(self, a, b=0):
        return a + b

    def blocking(self, seconds: float) -> str:
        time.sleep(seconds)
        return threading.current_thread().name

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def unencodable(self) -> object:
        return object()

    async def context(self) -> dict:
        ctx = polyrpc.current_context()
        return {
            "method": ctx.method,
            "transport": ctx.transport,
            "peer": str(ctx.peer),
            "user": ctx.metadata.get("user"),
            "has_deadline": ctx.deadline is not None,
        }


class Blobs:
    async def describe(self, data) -> list:
        return [type(data).__name__, data]


class Streams:
    def __init__(self) -> None:
        self.produced = 0
        self.finished = asyncio.Event()

    async def count(self, n: int):
        try:
            for i in range(n):
                self.produced = i + 1
                yield i
        finally:
            self.finished.set()

    async def total(self, numbers) -> int:
        return sum([n async for n in numbers])

    async def scaled_total(self, factor: int, numbers) -> int:
        return factor * sum([n async for n in numbers])

    async def fail_after(self, n: int):
        for i in range(n):
            yield i
        raise RuntimeError("generator broke")


class Callbacks:
    async def ask_client(self, x: int) -> int:
        return await polyrpc.current_context().call("ClientSide.double", x)


class ClientSide:
    def double(self, x: int) -> int:
        return 2 * x


@contextlib.asynccontextmanager
async def rpc(
    endpoint, *services, client_services=(), token=None, client_token=None, **server_opts
):
    async with polyrpc.serve(endpoint.listen_url, *services, token=token, **server_opts) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url, services=client_services, token=client_token) as client:
            yield server, client, url


async def test_calls_proxies_and_notify(endpoint):
    arith = Arith()
    async with rpc(endpoint, arith) as (_, client, _):
        assert await client.call("Arith.mul", 6, 7) == 42
        assert await client.call("Arith.add", a=1, b=2) == 3
        proxy = client.proxy("Arith")
        assert await proxy.add(1, 2) == 3
        assert await proxy.mul(b=3, a=4) == 12
        await client.notify("Arith.add", 1, 2)
        assert await client.call("Arith.add", [1], [2]) == [1, 2]
        assert await client.call("Arith.add", b"ab", b"cd") == b"abcd"


async def test_a_lone_bytes_argument_travels_raw(endpoint):
    async with rpc(endpoint, Blobs()) as (_, client, _):
        request_overhead = HEADER_SIZE + len("Blobs.describe")
        for arg in (b"abc", bytearray(b"abc"), memoryview(b"abc"), b"x" * (200 << 10), b""):
            before = client.bytes_out
            assert await client.call("Blobs.describe", arg) == ["bytes", bytes(arg)]
            assert client.bytes_out - before == request_overhead + len(arg)  # no encoding
        client.peer_features.discard("rawarg")  # a peer that does not know raw arguments
        before = client.bytes_out
        assert await client.call("Blobs.describe", b"abc") == ["bytes", b"abc"]
        assert client.bytes_out - before > request_overhead + 3  # sent as [args, kwargs]


async def test_sync_handlers_run_in_threads_without_blocking_the_loop(endpoint):
    async with rpc(endpoint, Arith()) as (_, client, _):
        slow = asyncio.create_task(client.call("Arith.blocking", 0.5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await client.call("Arith.mul", 2, 2) == 4
        assert time.monotonic() - started < 0.4, "a sync handler blocked the server loop"
        assert await slow != "MainThread"


async def test_inline_sync_option_runs_on_the_loop(endpoint):
    async with rpc(endpoint, Arith(), inline_sync=True) as (_, client, _):
        assert await client.call("Arith.blocking", 0) == "MainThread"


async def test_errors_come_back_as_remote_errors(endpoint):
    async with rpc(endpoint, Arith()) as (_, client, _):
        with pytest.raises(polyrpc.RemoteError) as info:
            await client.call("Arith.fail", "bad input")
        assert (info.value.type_name, info.value.message, info.value.code) == (
            "ValueError",
            "bad input",
            "handler_error",
        )
        assert info.value.remote_traceback is None
        with pytest.raises(polyrpc.RemoteError, match="Arith has: Arith.add, Arith.blocking"):
            await client.call("Arith.nope")
        with pytest.raises(polyrpc.RemoteError, match="available services: Arith, _sys") as info:
            await client.call("Nope.nope")
        assert info.value.code == "unknown_method"
        with pytest.raises(polyrpc.RemoteError) as info:
            await client.call("Arith.mul", 1)
        assert (info.value.type_name, info.value.code) == ("TypeError", "bad_arguments")
        with pytest.raises(polyrpc.RemoteError) as info:
            await client.call("Arith.unencodable")
        assert info.value.code == "unencodable_result"
        with pytest.raises(TypeError, match="cannot send these arguments"):
            await client.call("Arith.add", object(), 1)
        assert await client.call("Arith.add", 1, 1) == 2  # the connection is still fine


async def test_tracebacks_only_when_the_server_opts_in(endpoint):
    async with rpc(endpoint, Arith(), send_tracebacks=True) as (_, client, _):
        with pytest.raises(polyrpc.RemoteError) as info:
            await client.call("Arith.fail", "x")
        assert "Traceback" in info.value.remote_traceback
        assert "raise ValueError(message)" in info.value.remote_traceback


def test_error_classes_share_one_base():
    for cls in (
        polyrpc.RemoteError,
        polyrpc.CallTimeout,
        polyrpc.ConnectionLost,
        polyrpc.ProtocolError,
        polyrpc.TransportUnavailable,
        polyrpc.InvalidAddress,
    ):
        assert issubclass(cls, polyrpc.PolyrpcError)


async def test_timeout_cancels_the_remote_handler(endpoint):
    slow = Slow()
    async with rpc(endpoint, slow) as (_, client, _):
        started = time.monotonic()
        with pytest.raises(polyrpc.CallTimeout, match="Slow.wait timed out after 0.3s"):
            await client.call("Slow.wait", 30, timeout=0.3)
        assert time.monotonic() - started < 2
        await asyncio.wait_for(slow.cancelled.wait(), 5)


async def test_cancelling_the_caller_cancels_the_handler(endpoint):
    slow = Slow()
    async with rpc(endpoint, slow) as (_, client, _):
        task = asyncio.create_task(client.call("Slow.wait", 30))
        await asyncio.wait_for(slow.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(slow.cancelled.wait(), 5)
        assert await client.call("_sys.ping") == "pong"


async def test_context_has_peer_transport_metadata_and_deadline(endpoint):
    async with rpc(endpoint, Arith()) as (_, client, _):
        info = await client.call("Arith.context", metadata={"user": "ada"}, timeout=5)
        assert info == {
            "method": "Arith.context",
            "transport": endpoint.scheme,
            "peer": info["peer"],
            "user": "ada",
            "has_deadline": True,
        }
    with pytest.raises(RuntimeError, match="only available inside a handler"):
        polyrpc.current_context()


async def test_server_calls_back_into_the_client(endpoint):
    async with rpc(endpoint, Callbacks(), client_services=[ClientSide()]) as (_, client, _):
        assert await client.call("Callbacks.ask_client", 21) == 42


async def test_streaming_results_and_early_break(endpoint):
    streams = Streams()
    async with rpc(endpoint, streams) as (_, client, _):
        assert [i async for i in client.stream("Streams.count", 100)] == list(range(100))
        streams.finished.clear()
        async for i in client.stream("Streams.count", 10**9):
            if i == 5:
                break
        await asyncio.wait_for(streams.finished.wait(), 5)  # remote generator was cancelled
        assert streams.produced < 5 + 2 * STREAM_CREDIT
        got = []
        with pytest.raises(polyrpc.RemoteError, match="generator broke"):
            async for i in client.stream("Streams.fail_after", 3):
                got.append(i)
        assert got == [0, 1, 2]
        with pytest.raises(polyrpc.RemoteError) as info:
            await client.call("Streams.count", 3)
        assert info.value.code == "stream_mismatch"


async def test_slow_stream_consumer_stops_the_producer(endpoint):
    streams = Streams()
    async with rpc(endpoint, streams) as (_, client, _):
        stream = client.stream("Streams.count", 10**9)
        consumed = 0
        async for _ in stream:
            consumed += 1
            if consumed == 3:
                break_at = consumed
                await asyncio.sleep(0.5)  # a slow consumer: the producer must wait
                assert streams.produced <= break_at + STREAM_CREDIT + 1
            if consumed == 10:
                break
        await stream.aclose()


async def test_streaming_an_argument_to_the_server(endpoint):
    async with rpc(endpoint, Streams()) as (_, client, _):

        async def numbers():
            for i in range(1000):
                yield i

        assert await client.call("Streams.total", numbers()) == sum(range(1000))


async def test_one_argument_streams_wherever_it_stands(endpoint):
    async def numbers(n):
        for i in range(n):
            yield i

    async with rpc(endpoint, Streams()) as (_, client, _):
        assert await client.call("Streams.scaled_total", 3, numbers(10)) == 3 * sum(range(10))
        with pytest.raises(TypeError, match="only one argument"):
            await client.call("Streams.scaled_total", numbers(1), numbers(2))
        with pytest.raises(TypeError, match="only one argument"):
            async for _ in client.stream("Streams.count", numbers(1), numbers(2)):
                pass
        assert not client._pending  # nothing was sent for the refused calls
        assert await client.call("Streams.total", numbers(4)) == sum(range(4))


async def test_token_is_checked_at_hello(endpoint):
    async with polyrpc.serve(endpoint.listen_url, Arith(), token="s3cret") as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url, token="s3cret") as client:
            assert await client.call("Arith.mul", 2, 3) == 6
        for wrong in (None, "guess"):
            with pytest.raises(polyrpc.HandshakeError, match="token") as info:
                await polyrpc.connect(url, token=wrong)
            assert info.value.reason == "bad_token"


async def test_server_limits(endpoint):
    slow = Slow()
    async with polyrpc.serve(
        endpoint.listen_url, slow, max_connections=1, max_concurrent_calls=2
    ) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(url) as client:
            with pytest.raises(polyrpc.HandshakeError) as info:
                await polyrpc.connect(url)
            assert info.value.reason == "too_many_connections"
            calls = [asyncio.create_task(client.call("Slow.wait", 0.5)) for _ in range(2)]
            await asyncio.sleep(0.1)
            with pytest.raises(polyrpc.RemoteError) as info:
                await client.call("Slow.wait", 0)
            assert info.value.code == "too_many_calls"
            assert await asyncio.gather(*calls) == ["done", "done"]


class Big:
    """Results of any size, to cross the caller's receive limit."""

    async def blob(self, n: int) -> bytes:
        return b"x" * n

    async def text(self, n: int) -> str:
        return "y" * n

    def sync_blob(self, n: int) -> bytes:
        return b"z" * n

    async def chunks(self, *sizes: int):
        for n in sizes:
            yield b"c" * n

    async def size(self, data: bytes) -> int:
        return len(data)

    async def fail(self, n: int) -> None:
        raise ValueError("e" * n)


async def test_a_small_call_is_not_held_behind_a_bulk_call(endpoint):
    """A small call made while a 32 MiB call is being sent completes on its own: the caller
    does not wait for the bulk bytes to drain, and QUIC carries each call on its own stream
    (there the small call must finish long before the bulk one; single-stream transports
    carry it behind the bulk bytes, so only both results are checked)."""
    async with rpc(endpoint, Big(), Arith()) as (_, client, _):
        await client.call("Arith.mul", 1, 1)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def bulk_call() -> tuple[int, float]:
            size = await client.call("Big.size", b"b" * (32 << 20), timeout=120)
            return size, loop.time() - started

        bulk = asyncio.ensure_future(bulk_call())
        await asyncio.sleep(0)  # the bulk call is written (or queued) first
        assert await client.call("Arith.mul", 6, 7, timeout=120) == 42
        small = loop.time() - started
        size, elapsed = await bulk
        assert size == 32 << 20
        print(f"{endpoint.scheme}: small call {small * 1e3:.0f} ms, bulk {elapsed * 1e3:.0f} ms")
        if endpoint.scheme == "quic":
            assert small < 0.5 * elapsed, (small, elapsed)


async def test_too_large_argument_fails_that_call_only(endpoint):
    limits = polyrpc.Limits(max_frame=64 << 10)

    async def items():
        yield b"small"
        yield b"x" * (128 << 10)

    async with rpc(endpoint, Arith(), Big(), Slow(), Streams(), limits=limits) as (_, client, _):
        assert client.peer_info["max_frame"] == str(64 << 10)
        other = asyncio.create_task(client.call("Slow.wait", 0.3))
        for attempt in (
            lambda: client.call("Big.size", b"x" * (128 << 10)),
            lambda: asyncio.wait_for(client.call("Streams.total", items()), 10),
            lambda: client.call("Arith.add", "a" * (128 << 10), ""),
            lambda: client.call("Big.size", b"x" * (128 << 10), timeout=5, metadata={"k": "v"}),
            lambda: client.notify("Big.size", b"x" * (128 << 10)),
        ):
            with pytest.raises(polyrpc.MessageTooLarge, match=str(64 << 10)) as info:
                await attempt()
            assert info.value.limit == 64 << 10
            assert info.value.size > info.value.limit
            assert isinstance(info.value, ValueError)
            assert client.in_flight <= 1  # nothing left pending for the refused call
        # exactly at the limit still goes (the whole frame counts, header included)
        fits = (64 << 10) - HEADER_SIZE - len("Big.size")
        assert await client.call("Big.size", b"x" * fits) == fits
        with pytest.raises(polyrpc.MessageTooLarge):
            await client.call("Big.size", b"x" * (fits + 1))
        assert await client.call("Arith.add", 1, 2) == 3
        assert await other == "done"


async def test_too_large_result_is_a_remote_error_and_the_connection_survives(endpoint):
    async with polyrpc.serve(endpoint.listen_url, Big(), Slow()) as server:
        url = endpoint.client_url(server.urls[0])
        limits = polyrpc.Limits(max_frame=64 << 10)
        async with polyrpc.connect(url, limits=limits) as client:
            other = asyncio.create_task(client.call("Slow.wait", 0.3))
            for method in ("Big.blob", "Big.text", "Big.sync_blob"):
                with pytest.raises(polyrpc.RemoteError, match=str(64 << 10)) as info:
                    await client.call(method, 128 << 10)
                assert info.value.code == "result_too_large"
                assert await client.call(method, 10) in (b"x" * 10, "y" * 10, b"z" * 10)
            with pytest.raises(polyrpc.RemoteError) as info:
                await client.call("Big.blob", 128 << 10, timeout=5)
            assert info.value.code == "result_too_large"
            items = []
            with pytest.raises(polyrpc.RemoteError) as info:
                async for item in client.stream("Big.chunks", 10, 128 << 10, 10):
                    items.append(item)
            assert info.value.code == "result_too_large"
            assert items == [b"c" * 10]
            with pytest.raises(polyrpc.RemoteError) as info:  # an error too big: still said
                await client.call("Big.fail", 128 << 10)
            assert info.value.code == "result_too_large"
            assert await client.call("Big.blob", 3) == b"xxx"
            assert await other == "done"


async def test_a_frame_over_the_limit_from_a_peer_ignoring_it_is_named(endpoint):
    limits = polyrpc.Limits(max_frame=64 << 10)
    async with rpc(endpoint, Big(), limits=limits) as (_, client, url):
        # a peer that does not know the limit (an older version): it assumes the default
        client._peer_max_frame = polyrpc.Limits().max_frame
        client._send_check = client._peer_max_frame - HEADER_SIZE - (128 << 10)
        with pytest.raises(polyrpc.ConnectionLost, match=f"limit of {64 << 10}"):
            await asyncio.wait_for(client.call("Big.size", b"x" * (128 << 10)), 10)
        async with polyrpc.connect(url) as other:
            assert await other.call("Big.size", b"x") == 1


async def test_max_connections_counts_each_connection_once(endpoint):
    async with polyrpc.serve(endpoint.listen_url, Arith(), max_connections=10) as server:
        url = endpoint.client_url(server.urls[0])
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(10):
                client = await stack.enter_async_context(polyrpc.connect(url))
                assert await client.call("Arith.mul", 2, 3) == 6
            assert len(server.connections) == 10 and not server.handshaking
            with pytest.raises(polyrpc.HandshakeError, match="limit of 10") as info:
                await polyrpc.connect(url)
            assert info.value.reason == "too_many_connections"
        for _ in range(100):  # the closed ones leave room again
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        async with polyrpc.connect(url) as client:
            assert await client.call("Arith.mul", 3, 3) == 9


async def test_max_handshaking_refuses_newcomers_at_once(endpoint):
    # the silent peers must still be in the handshake after the refusals below: 6 s leaves
    # room for slow dials (rdma in the emulated VM took over 3 s for these steps)
    async with polyrpc.serve(
        endpoint.listen_url, Arith(), max_handshaking=3, handshake_timeout=6.0
    ) as server:
        url = endpoint.client_url(server.urls[0])
        silent = await hold_handshakes(endpoint, url, server.handshaking, 3)
        assert not server.connections
        await assert_newcomers_refused(endpoint, url)
        assert len(server.handshaking) == 3
        with pytest.raises(polyrpc.HandshakeError, match="busy") as info:
            await polyrpc.connect(url)
        assert info.value.reason == "too_many_handshakes"
        for _ in range(300):  # the silent ones time out and leave room
            if not server.handshaking:
                break
            await asyncio.sleep(0.05)
        assert not server.handshaking
        async with polyrpc.connect(url) as client:
            assert await client.call("Arith.mul", 4, 5) == 20
            assert len(server.connections) == 1 and not server.handshaking
        for raw in silent:
            raw.abort()


async def test_frames_before_hello_are_refused_by_name(endpoint):
    transport = endpoint.transport
    async with polyrpc.serve(endpoint.listen_url, Arith()) as server:
        url = endpoint.client_url(server.urls[0])
        address = transport.parse(url)
        for kind in (Kind.RESPONSE, Kind.ERROR, Kind.REQUEST, Kind.HEARTBEAT):
            raw = await transport.dial(address)
            recorder = Recorder()
            raw.set_receiver(recorder)
            await raw.send(encode_frame(kind, 1, b"\xc0", method="Arith.mul" * (kind == 2)))
            await asyncio.wait_for(recorder.closed_by_peer(), 5)  # closed, and told why
            bodies = error_frames(recorder.data)
            assert [(b["code"], b["message"]) for b in bodies] == [
                ("protocol_error", f"{kind.name} before HELLO")
            ]
            raw.abort()
        async with polyrpc.connect(url) as client:
            assert await client.call("Arith.mul", 4, 5) == 20


async def test_sys_service(endpoint):
    async with rpc(endpoint, Arith()) as (_, client, _):
        assert await client.call("_sys.ping") == "pong"
        for _ in range(3):
            await client.call("Arith.mul", 1, 2)
        with contextlib.suppress(polyrpc.RemoteError):
            await client.call("Arith.fail", "x")
        stats = await client.call("_sys.stats")
        assert stats["connections"] == 1
        assert stats["methods"]["Arith.mul"]["calls"] == 3
        assert stats["methods"]["Arith.fail"]["errors"] == 1
        assert stats["methods"]["Arith.mul"]["p50_us"] > 0
        assert stats["transports"][endpoint.scheme]["bytes_in"] > 0
        assert stats["uptime_s"] >= 0
        methods = {m["name"]: m for m in await client.call("_sys.methods")}
        assert methods["Arith.mul"]["signature"] == "Arith.mul(a: int, b: int) -> int"
        assert methods["Arith.mul"]["doc"] == "Multiply."
        assert "_sys.stats" in methods


async def test_graceful_server_close_finishes_calls(endpoint):
    slow = Slow()
    server = await polyrpc.serve(endpoint.listen_url, slow)
    client = await polyrpc.connect(endpoint.client_url(server.urls[0]))
    call = asyncio.create_task(client.call("Slow.wait", 0.3))
    await asyncio.wait_for(slow.started.wait(), 5)
    await server.close()
    assert await call == "done"
    with pytest.raises(polyrpc.ConnectionLost):
        await client.call("Slow.wait", 0)
    await client.close()


async def test_one_server_on_several_transports(tmp_path):
    """One Server, one service, listening on tcp, unix and mem at once."""
    urls = ["tcp@127.0.0.1:0", f"unix@{tmp_path / 's.sock'}", "mem@0"]
    async with polyrpc.serve(urls, Arith()) as server:
        assert len(server.urls) == 3
        for url in server.urls:
            async with polyrpc.connect(url) as client:
                assert await client.call("Arith.mul", 3, 4) == 12
                assert client.transport == url.split("@")[0]
        stats = await polyrpc.connect(server.urls[0])
        try:
            totals = (await stats.call("_sys.stats"))["transports"]
        finally:
            await stats.close()
        assert {"tcp", "unix", "mem"} <= set(totals)


async def test_a_request_reusing_a_running_calls_seq_is_a_protocol_error(endpoint):
    """The running call would be orphaned (its task collected mid-await, no reply ever):
    the peer is told why and dropped, and the running handler is cancelled."""
    hello = encode_frame(Kind.HELLO, 0, metadata={"version": "1", "codec": "msgpack"})[0]
    request = b"".join(
        encode_frame(Kind.REQUEST, 7, msgpack.packb([[30.0], {}]), method="Slow.wait", codec=1)
    )
    service = Slow()
    async with polyrpc.serve(endpoint.listen_url, service) as server:
        raw = await endpoint.transport.dial(
            endpoint.transport.parse(endpoint.client_url(server.urls[0]))
        )
        recorder = Recorder()
        raw.set_receiver(recorder)
        await raw.send([hello, request])
        await asyncio.wait_for(service.started.wait(), 5)
        await raw.send([request])
        await asyncio.wait_for(recorder.closed_by_peer(), 5)
        [body] = error_frames(recorder.data)
        assert body["code"] == "protocol_error" and "reuses the seq" in body["message"]
        await asyncio.wait_for(service.cancelled.wait(), 5)
        raw.abort()


async def test_a_request_with_an_unknown_codec_id_fails_alone(endpoint):
    """The decoder checks magic, version and kind; a codec id it does not know fails only
    that call (``bad_request``, naming the id), and the connection goes on serving."""
    hello = encode_frame(Kind.HELLO, 0, metadata={"version": "1", "codec": "msgpack"})[0]
    unknown = encode_frame(Kind.REQUEST, 7, b"\x92\x92\x06\x07\x80", method="Arith.mul", codec=77)
    valid = encode_frame(Kind.REQUEST, 9, msgpack.packb([[6, 7], {}]), method="Arith.mul", codec=1)
    async with polyrpc.serve(endpoint.listen_url, Arith()) as server:
        raw = await endpoint.transport.dial(
            endpoint.transport.parse(endpoint.client_url(server.urls[0]))
        )
        recorder = Recorder()
        raw.set_receiver(recorder)
        await raw.send([hello, *unknown, *valid])
        decoder = FrameDecoder(polyrpc.Limits())
        answers: dict[int, object] = {}
        async with asyncio.timeout(5):
            while len(answers) < 2:
                await asyncio.sleep(0.01)
                data, recorder.data = bytes(recorder.data), bytearray()
                for frame in decoder.feed(data):
                    if frame.kind in (Kind.RESPONSE, Kind.ERROR) and frame.seq:
                        answers[frame.seq] = (Kind(frame.kind), msgpack.unpackb(frame.payload))
        kind, body = answers[7]
        assert kind == Kind.ERROR and body["code"] == "bad_request"
        assert "unknown codec id 77" in body["message"]
        assert answers[9] == (Kind.RESPONSE, 42)
        assert not recorder.eof.is_set() and not recorder.lost.is_set()
        raw.abort()
