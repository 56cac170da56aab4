"""The RPC behaviours, run over every usable transport (see conftest.usable_transports)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

import polyrpc
from polyrpc.core.frames import HEADER_SIZE
from polyrpc.core.rpc import STREAM_CREDIT


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


class Slow:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def wait(self, seconds: float) -> str:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "done"


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


async def test_max_frame_size_limit(endpoint):
    limits = polyrpc.Limits(max_frame=64 << 10)
    async with rpc(endpoint, Arith(), limits=limits) as (_, client, url):
        with pytest.raises(polyrpc.ConnectionLost):
            await client.call("Arith.add", b"x" * (128 << 10), b"")
        async with polyrpc.connect(url) as other:
            assert await other.call("Arith.add", 1, 2) == 3


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
