"""Faults never lose a reply, end a server or hang a caller (issue 15 items 2, 3, 4, 5, 7),
over every usable transport; tests/test_rpc_reference.py runs them on the Python path too."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import polyrpc
from tests.conftest import (
    SUBPROCESS_ENV,
    Endpoint,
    serve_subprocess,
    subprocess_schemes,
    usable_transports,
)
from tests.rpc_fault_services import Faulty, Gated, Guarded
from tests.test_rpc_conformance import rpc

FAULTY = "tests.rpc_fault_services:Faulty"
REPLY_WITHIN = 10.0
"""Bound on waiting for any reply here: a lost reply fails the test instead of hanging it."""


async def remote_error(client: polyrpc.Client, method: str, *args, **kwargs) -> polyrpc.RemoteError:
    """The RemoteError the call ends with (the test fails if it hangs or succeeds)."""
    with pytest.raises(polyrpc.RemoteError) as info:
        await asyncio.wait_for(client.call(method, *args, **kwargs), REPLY_WITHIN)
    return info.value


async def until(condition, within: float = REPLY_WITHIN) -> None:
    """Poll ``condition`` (no helper thread: a saturated pool must not stall the test)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def entered(gated: Gated, count: int) -> None:
    """Wait until ``count`` more calls entered ``Gated.hold``."""
    for _ in range(count):
        await until(lambda: gated.entered.acquire(blocking=False))


async def test_a_handlers_own_timeout_error_is_answered(endpoint):
    async with rpc(endpoint, Faulty()) as (_, client, _):
        for method in ("Faulty.own_timeout", "Faulty.eager_timeout"):
            for timeout in (None, 30.0):
                error = await remote_error(client, method, timeout=timeout)
                assert (error.type_name, error.code) == ("TimeoutError", "handler_error")
        assert await client.call("Faulty.ping") == "alive"


async def test_a_cancelled_error_the_caller_did_not_cause_is_answered(endpoint):
    async with rpc(endpoint, Faulty()) as (_, client, _):
        for method in ("Faulty.inner_cancelled", "Faulty.eager_cancelled"):
            for timeout in (None, 30.0):
                error = await remote_error(client, method, timeout=timeout)
                assert (error.type_name, error.code) == ("CancelledError", "handler_error")
        assert await client.call("Faulty.ping") == "alive"


async def test_system_exit_and_keyboard_interrupt_in_a_handler_end_only_that_call(endpoint, caplog):
    caplog.set_level(logging.ERROR, logger="polyrpc")
    async with rpc(endpoint, Faulty()) as (_, client, _):
        cases = [
            ("Faulty.exit", (False,), "SystemExit"),
            ("Faulty.exit", (True,), "SystemExit"),
            ("Faulty.interrupt", (False,), "KeyboardInterrupt"),
            ("Faulty.interrupt", (True,), "KeyboardInterrupt"),
            ("Faulty.sync_exit", (), "SystemExit"),
            ("Faulty.sync_interrupt", (), "KeyboardInterrupt"),
        ]
        for method, args, type_name in cases:
            for timeout in (None, 30.0):
                error = await remote_error(client, method, *args, timeout=timeout)
                assert (error.type_name, error.code) == (type_name, "internal_error")
        assert await client.call("Faulty.ping") == "alive"
    logged = [r.getMessage() for r in caplog.records if "internal_error" in r.getMessage()]
    assert len(logged) == 2 * len(cases)


@pytest.mark.parametrize("served_scheme", subprocess_schemes())
def test_a_polyrpc_serve_process_survives_system_exit_in_handlers(served_scheme, tmp_path):
    endpoint = Endpoint(served_scheme, tmp_path)
    pool = ("--sync-workers", "1", "--sync-queue", "0")
    with serve_subprocess(endpoint, FAULTY, *pool) as (server, url):

        async def exercise() -> None:
            async with polyrpc.connect(url) as client:
                for method, args in [
                    ("Faulty.exit", (False,)),
                    ("Faulty.exit", (True,)),
                    ("Faulty.interrupt", (False,)),
                    ("Faulty.sync_exit", ()),
                    ("Faulty.sync_interrupt", ()),
                ]:
                    error = await remote_error(client, method, *args)
                    assert error.code == "internal_error"
            async with polyrpc.connect(url) as client:  # a new connection: the process lives
                assert await client.call("Faulty.ping") == "alive"
                # the command line's pool options: one sync thread, no queue
                blocked = asyncio.create_task(client.call("Faulty.block", 1.0))
                await asyncio.sleep(0.3)
                assert (await remote_error(client, "Faulty.sync_exit")).code == "overloaded"
                assert await blocked == "unblocked"

        asyncio.run(exercise())
        assert server.poll() is None, "the server process ended"


async def test_a_streamed_argument_that_raises_fails_the_call_and_ends_the_handler(endpoint):
    """The call fails at once with the argument's error; a deadline still ends with
    CallTimeout when the argument is merely slow."""
    guarded = Guarded()

    async def numbers_then_failure():
        yield 1
        yield 2
        raise ValueError("the source broke")

    async with rpc(endpoint, guarded) as (server, client, _):
        for timeout in (None, 30.0):
            guarded.started.clear()
            guarded.cancelled.clear()
            with pytest.raises(ValueError, match="the source broke"):
                await asyncio.wait_for(
                    client.call("Guarded.total", numbers_then_failure(), timeout=timeout),
                    REPLY_WITHIN,
                )
            # the server was told: its handler ended (or never began, when the CANCEL came
            # before the task's first step) and it holds nothing for the call
            (connection,) = server.connections
            async with asyncio.timeout(REPLY_WITHIN):
                while handlers := connection.incoming_tasks():
                    await asyncio.wait(handlers)
            assert guarded.cancelled.is_set() or not guarded.started.is_set()
        assert not client._pending  # nothing left behind
        assert await client.call("Guarded.wait", 0) == "done"

        async def endless():
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)

        started = time.monotonic()
        with pytest.raises(polyrpc.CallTimeout):
            await asyncio.wait_for(
                client.call("Guarded.total", endless(), timeout=0.3), REPLY_WITHIN
            )
        assert time.monotonic() - started < 3


async def test_a_streaming_call_always_times_out_with_call_timeout(endpoint):
    async with rpc(endpoint, Guarded()) as (_, client, _):
        for _ in range(8):
            got = []
            with pytest.raises(polyrpc.CallTimeout):
                async with asyncio.timeout(REPLY_WITHIN):
                    async for item in client.stream("Guarded.ticks", 0.02, timeout=0.2):
                        got.append(item)
            assert got  # items flowed until the deadline


async def test_sync_handlers_never_run_on_the_loop_and_notify_neither(endpoint):
    gated = Gated()
    async with rpc(endpoint, gated) as (_, client, _):
        await client.notify("Gated.note")
        await until(gated.noted.is_set)
        assert gated.notified and gated.notified[0] != threading.main_thread().name
        gated.gate.set()
        assert await client.call("Gated.hold") != threading.main_thread().name


async def test_a_saturated_sync_pool_delays_only_sync_handlers(endpoint, caplog):
    caplog.set_level(logging.WARNING, logger="polyrpc")
    gated = Gated()
    async with rpc(endpoint, gated, sync_workers=2, sync_queue=1) as (_, client, _):
        try:
            held = [asyncio.create_task(client.call("Gated.hold")) for _ in range(2)]
            await entered(gated, 2)  # both workers are blocked
            queued = asyncio.create_task(client.call("Gated.hold"))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            assert await client.call("Gated.quick") == "quick"  # async calls are not held up
            assert await client.call("_sys.ping") == "pong"
            assert time.monotonic() - started < 2
            error = await remote_error(client, "Gated.hold")  # workers and queue are full
            assert error.code == "overloaded"
            await client.notify("Gated.note")
            assert await client.call("_sys.ping") == "pong"
            await asyncio.sleep(0.2)
            assert any(
                "Gated.note" in r.getMessage() and "dropped" in r.getMessage()
                for r in caplog.records
            )
            assert not gated.notified
        finally:
            gated.gate.set()
        assert len(set(await asyncio.gather(*held, queued))) >= 1
        await client.notify("Gated.note")  # room again: it runs
        await until(gated.noted.is_set)


async def test_the_default_sync_pool_is_not_exhausted_by_a_few_blocked_handlers(endpoint):
    gated = Gated()
    async with rpc(endpoint, gated) as (_, client, _):
        try:
            held = [asyncio.create_task(client.call("Gated.hold")) for _ in range(13)]
            await entered(gated, len(held))  # all of them run at once
        finally:
            gated.gate.set()
        await asyncio.gather(*held)


async def test_no_unretrieved_future_error_when_a_connection_is_lost_mid_write(endpoint):
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    try:
        async with rpc(endpoint, Guarded()) as (_, client, _):
            calls = [
                asyncio.create_task(client.call("Guarded.wait", 5, b"x" * (4 << 20)))
                for _ in range(4)
            ]
            await asyncio.sleep(0.05)
            client.abort()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, polyrpc.PolyrpcError) for o in outcomes), outcomes
            del calls, outcomes
        gc.collect()
        await asyncio.sleep(0.1)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert not [m for m in reported if "never retrieved" in m], reported


CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import polyrpc

    async def main():
        client = await polyrpc.connect(sys.argv[1])
        call = asyncio.ensure_future(client.call("Guarded.wait", 60))
        await asyncio.sleep(0.1)
        print("calling", flush=True)
        await call

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    "killed_scheme", [s for s in ("tcp", "unix", "tls") if s in usable_transports()]
)
async def test_a_killed_clients_handlers_are_cancelled_at_once(killed_scheme):
    """An EOF without GOAWAY is an abort; a graceful close still lets calls finish."""
    guarded = Guarded()
    with tempfile.TemporaryDirectory(prefix="prpc") as workdir:
        endpoint = Endpoint(killed_scheme, Path(workdir))
        async with polyrpc.serve(endpoint.listen_url, guarded) as server:
            graceful = await polyrpc.connect(endpoint.client_url(server.urls[0]))
            call = asyncio.create_task(graceful.call("Guarded.wait", 0.3))
            await asyncio.wait_for(guarded.started.wait(), REPLY_WITHIN)
            await graceful.close()  # GOAWAY, then the reply it still waits for
            assert await call == "done"
            assert not guarded.cancelled.is_set()
            guarded.started.clear()
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                endpoint.client_url(server.urls[0]),
                stdout=subprocess.PIPE,
                env=SUBPROCESS_ENV,
            )
            try:
                assert client.stdout is not None
                line = await asyncio.wait_for(client.stdout.readline(), 30)
                assert line.startswith(b"calling")
                await asyncio.wait_for(guarded.started.wait(), REPLY_WITHIN)
                client.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait_for(guarded.cancelled.wait(), REPLY_WITHIN)
                assert time.monotonic() - killed < 3
            finally:
                if client.returncode is None:
                    client.kill()
                await client.wait()
