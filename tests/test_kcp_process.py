"""A kcp server in its own process survives hostile and broken clients (issue 15, item 1).

A failed notify used to leave a cffi export of the frame decoder's buffer alive in a frame
kept by its traceback; when the cyclic GC cleared that memoryview before the export, the
server died with SIGSEGV after about ten such connections. Run against both the C and the
pure-Python frame decoders in the server.
"""

from __future__ import annotations

import asyncio
import gc

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
