"""Middleware on both sides of real connections, over every usable transport."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

import polyrpc
from polyrpc import Call, CallNext, Middleware
from tests.rpc_fault_services import Slow
from tests.test_rpc_conformance import Callbacks, ClientSide, Streams


@contextlib.asynccontextmanager
async def rpc(
    endpoint,
    *services: Any,
    server_middleware: Sequence[Middleware] = (),
    client_middleware: Sequence[Middleware] = (),
    client_services: Sequence[Any] = (),
    **server_options: Any,
) -> AsyncIterator[tuple[polyrpc.Server, polyrpc.Client]]:
    async with polyrpc.serve(
        endpoint.listen_url, *services, middleware=server_middleware, **server_options
    ) as server:
        url = endpoint.client_url(server.urls[0])
        async with polyrpc.connect(
            url, services=client_services, middleware=client_middleware
        ) as client:
            yield server, client


def recording(name: str, events: list[tuple[str, ...]]) -> Middleware:
    """A middleware that records when it enters and leaves each call."""

    async def record(call: Call, call_next: CallNext) -> Any:
        events.append((name, "in", call.method, call.kind, str(call.incoming)))
        try:
            return await call_next(call)
        finally:
            events.append((name, "out", call.method, call.kind, str(call.incoming)))

    return record


class Counter:
    """Handlers that count their runs and how many run at once."""

    def __init__(self) -> None:
        self.runs = 0
        self.running = 0
        self.most_running = 0
        self.notified = asyncio.Event()
        self.notes: list[Any] = []

    async def hit(self) -> int:
        self.runs += 1
        return self.runs

    async def hold(self, seconds: float) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1

    async def note(self, value: Any) -> None:
        self.notes.append((value, polyrpc.current_context().metadata.get("note")))
        self.notified.set()

    async def metadata(self) -> dict[str, str]:
        context = polyrpc.current_context()
        return {**context.metadata, "deadline": str(context.deadline is not None)}


class Flaky:
    """Handlers failing their first ``failures`` runs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs: dict[str, int] = {}

    def _run(self, name: str) -> str:
        self.runs[name] = self.runs.get(name, 0) + 1
        if self.runs[name] <= self.failures:
            raise ValueError(f"{name} failure {self.runs[name]}")
        return f"{name} ok"

    async def read(self) -> str:
        return self._run("read")

    async def write(self) -> str:
        return self._run("write")


async def test_order_is_outermost_first_on_both_sides(endpoint):
    events: list[tuple[str, ...]] = []

    class Recorded(Counter):
        async def hit(self) -> int:
            events.append(("handler",))
            return await super().hit()

    async with rpc(
        endpoint,
        ("Counter", Recorded()),
        server_middleware=[recording("s1", events), recording("s2", events)],
        client_middleware=[recording("c1", events), recording("c2", events)],
    ) as (_, client):
        assert await client.call("Counter.hit") == 1
    steps = [event[:2] for event in events]
    assert steps == [
        ("c1", "in"),
        ("c2", "in"),
        ("s1", "in"),
        ("s2", "in"),
        ("handler",),
        ("s2", "out"),
        ("s1", "out"),
        ("c2", "out"),
        ("c1", "out"),
    ]
    assert {event[2:] for event in events if len(event) > 1} == {
        ("Counter.hit", "call", "False"),
        ("Counter.hit", "call", "True"),
    }


async def test_metadata_travels_from_client_middleware_to_server_and_handler(endpoint):
    seen: list[dict[str, Any]] = []

    async def tag(call: Call, call_next: CallNext) -> Any:
        call.metadata["user"] = "ada"
        return await call_next(call)

    async def look(call: Call, call_next: CallNext) -> Any:
        seen.append({**call.metadata, "deadline": call.deadline is not None})
        call.metadata["checked"] = "yes"  # the handler's context sees the same map
        return await call_next(call)

    async with rpc(endpoint, Counter(), server_middleware=[look], client_middleware=[tag]) as (
        _,
        client,
    ):
        got = await client.call("Counter.metadata", metadata={"trace": "t1"})
        assert got == {"user": "ada", "trace": "t1", "checked": "yes", "deadline": "False"}
        got = await client.call("Counter.metadata", timeout=5)
        assert got["deadline"] == "True" and float(got["timeout"]) == pytest.approx(5, abs=0.1)
    assert seen[0] == {"user": "ada", "trace": "t1", "deadline": False}
    assert seen[1]["deadline"] is True and seen[1]["user"] == "ada"


async def test_the_timeout_still_cancels_the_handler_through_middleware(endpoint):
    slow = Slow()
    passing = recording("pass", [])
    async with rpc(endpoint, slow, server_middleware=[passing], client_middleware=[passing]) as (
        _,
        client,
    ):
        started = time.monotonic()
        with pytest.raises(polyrpc.CallTimeout, match="Slow.wait timed out after 0.3s"):
            await client.call("Slow.wait", 30, timeout=0.3)
        assert time.monotonic() - started < 2
        await asyncio.wait_for(slow.cancelled.wait(), 5)


async def test_cancelling_the_caller_cancels_the_handler_through_middleware(endpoint):
    slow = Slow()
    passing = recording("pass", [])
    async with rpc(endpoint, slow, server_middleware=[passing], client_middleware=[passing]) as (
        _,
        client,
    ):
        task = asyncio.create_task(client.call("Slow.wait", 30))
        await asyncio.wait_for(slow.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(slow.cancelled.wait(), 5)
        assert await client.call("_sys.ping") == "pong"


async def test_retry_leaves_a_streamed_argument_alone(endpoint):
    class Summing(Flaky):
        async def total(self, numbers) -> int:
            self._run("total")
            return sum([n async for n in numbers])

    summing = Summing(failures=1)
    again = polyrpc.retry(3, backoff=0.001, idempotent={"Summing.total"})
    async with rpc(endpoint, summing, client_middleware=[again]) as (_, client):
        with pytest.raises(polyrpc.RemoteError, match="total failure 1"):
            await client.call("Summing.total", numbers(3))
        assert summing.runs["total"] == 1
        assert await client.call("Summing.total", numbers(3)) == 3


async def test_server_middleware_short_circuits_with_a_result_or_an_exception(endpoint):
    counter = Counter()

    async def gate(call: Call, call_next: CallNext) -> Any:
        if call.metadata.get("cached"):
            return "from the cache"
        if call.metadata.get("user") != "ada":
            raise polyrpc.RemoteError("PermissionError", "who are you?", "unauthorized")
        return await call_next(call)

    async with rpc(endpoint, counter, server_middleware=[gate]) as (_, client):
        assert await client.call("Counter.hit", metadata={"cached": "1"}) == "from the cache"
        with pytest.raises(polyrpc.RemoteError) as refused:
            await client.call("Counter.hit")
        assert (refused.value.type_name, refused.value.code) == ("PermissionError", "unauthorized")
        assert counter.runs == 0
        assert await client.call("Counter.hit", metadata={"user": "ada"}) == 1


async def test_client_middleware_short_circuits_without_sending(endpoint):
    counter = Counter()

    async def local(call: Call, call_next: CallNext) -> Any:
        if call.method == "Counter.hit":
            return -1
        if call.method == "Counter.hold":
            raise LookupError("not here")
        return await call_next(call)

    async with rpc(endpoint, counter, client_middleware=[local]) as (_, client):
        before = client.bytes_out
        assert await client.call("Counter.hit") == -1
        with pytest.raises(LookupError, match="not here"):
            await client.call("Counter.hold", 0)
        assert client.bytes_out == before and counter.runs == 0
        assert await client.call("_sys.ping") == "pong"


async def test_retry_repeats_idempotent_calls_and_refusals_only(endpoint):
    flaky = Flaky(failures=2)
    refusals: list[str] = []

    async def refuse_once(call: Call, call_next: CallNext) -> Any:
        if call.metadata.get("refuse") and not refusals:
            refusals.append(call.method)
            raise polyrpc.RemoteError("RuntimeError", "busy", "overloaded")
        return await call_next(call)

    again = polyrpc.retry(3, backoff=0.001, idempotent={"Flaky.read"})
    async with rpc(endpoint, flaky, server_middleware=[refuse_once], client_middleware=[again]) as (
        _,
        client,
    ):
        assert await client.call("Flaky.read") == "read ok"
        assert flaky.runs["read"] == 3
        with pytest.raises(polyrpc.RemoteError, match="write failure 1") as failed:
            await client.call("Flaky.write")
        assert failed.value.code == "handler_error"
        assert flaky.runs["write"] == 1, "a method not marked idempotent was retried"
        # a refusal before the handler ran is retried whatever the method
        with pytest.raises(polyrpc.RemoteError, match="write failure 2"):
            await client.call("Flaky.write", metadata={"refuse": "1"})
        assert refusals == ["Flaky.write"] and flaky.runs["write"] == 2


async def test_retry_gives_up_after_its_attempts(endpoint):
    flaky = Flaky(failures=5)
    again = polyrpc.retry(2, backoff=0.001, idempotent=lambda call: call.method.endswith("read"))
    async with rpc(endpoint, flaky, client_middleware=[again]) as (_, client):
        with pytest.raises(polyrpc.RemoteError, match="read failure 2"):
            await client.call("Flaky.read")
        assert flaky.runs["read"] == 2


async def test_limit_concurrency_holds_at_its_limit(endpoint):
    counter = Counter()
    limit = polyrpc.limit_concurrency(3)
    async with rpc(endpoint, counter, server_middleware=[limit]) as (_, client):
        await asyncio.gather(*[client.call("Counter.hold", 0.02) for _ in range(12)])
    assert counter.most_running == 3  # never more, and the limit lets three run together


async def test_notifications_go_through_both_sides(endpoint):
    counter = Counter()
    events: list[tuple[str, ...]] = []

    async def tag(call: Call, call_next: CallNext) -> Any:
        call.metadata["note"] = "tagged"
        return await call_next(call)

    async with rpc(
        endpoint,
        counter,
        server_middleware=[recording("server", events)],
        client_middleware=[recording("client", events), tag],
    ) as (_, client):
        await client.notify("Counter.note", 7)
        await asyncio.wait_for(counter.notified.wait(), 5)
    assert counter.notes == [(7, "tagged")]
    assert ("client", "in", "Counter.note", "notify", "False") in events
    assert ("server", "in", "Counter.note", "notify", "True") in events


def scaling(factor: int, offset: int = 0) -> Middleware:
    """Wraps a stream's items (or a streamed argument's) in ``item * factor + offset``."""

    async def scale(items: Any) -> AsyncIterator[Any]:
        try:
            async for item in items:
                yield item * factor + offset
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    async def wrap(call: Call, call_next: CallNext) -> Any:
        for index, arg in enumerate(call.args):
            if hasattr(arg, "__aiter__"):
                call.args[index] = scale(arg)
        result = await call_next(call)
        return scale(result) if call.kind == "stream" else result

    return wrap


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def test_middleware_wraps_result_streams_and_streamed_arguments(endpoint):
    streams = Streams()
    async with rpc(
        endpoint, streams, server_middleware=[scaling(10)], client_middleware=[scaling(1, 1)]
    ) as (_, client):
        assert [i async for i in client.stream("Streams.count", 5)] == [1, 11, 21, 31, 41]
        # leaving early still stops the remote generator through the wrappers
        streams.finished.clear()
        async with client.stream("Streams.count", 10**9) as items:
            async for item in items:
                if item > 50:
                    break
        await asyncio.wait_for(streams.finished.wait(), 5)
        # a streamed argument: the client's wrapper adds 1, the server's multiplies by 10
        assert await client.call("Streams.total", numbers(4)) == 10 * (1 + 2 + 3 + 4)


async def test_limit_concurrency_holds_a_stream_until_it_ends(endpoint):
    async with rpc(
        endpoint, Streams(), Counter(), server_middleware=[polyrpc.limit_concurrency(1)]
    ) as (_, client):
        items = client.stream("Streams.count", 10**9)
        assert await anext(items) == 0
        blocked = asyncio.create_task(client.call("Counter.hit"))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        await items.aclose()
        assert await asyncio.wait_for(blocked, 5) == 1


async def test_callbacks_run_each_sides_middleware(endpoint):
    server_events: list[tuple[str, ...]] = []
    client_events: list[tuple[str, ...]] = []
    async with rpc(
        endpoint,
        Callbacks(),
        client_services=[ClientSide()],
        server_middleware=[recording("server", server_events)],
        client_middleware=[recording("client", client_events)],
    ) as (_, client):
        assert await client.call("Callbacks.ask_client", 21) == 42
    assert [event[1:] for event in client_events] == [
        ("in", "Callbacks.ask_client", "call", "False"),
        ("in", "ClientSide.double", "call", "True"),
        ("out", "ClientSide.double", "call", "True"),
        ("out", "Callbacks.ask_client", "call", "False"),
    ]
    assert [event[1:] for event in server_events] == [
        ("in", "Callbacks.ask_client", "call", "True"),
        ("in", "ClientSide.double", "call", "False"),
        ("out", "ClientSide.double", "call", "False"),
        ("out", "Callbacks.ask_client", "call", "True"),
    ]


async def test_a_raising_middleware_is_reported_and_the_connection_survives(endpoint):
    def broken(side: str) -> Middleware:
        async def fail(call: Call, call_next: CallNext) -> Any:
            if call.metadata.get("break") == side:
                raise RuntimeError(f"{side} middleware broke")
            return await call_next(call)

        return fail

    async with rpc(
        endpoint,
        Counter(),
        server_middleware=[broken("server")],
        client_middleware=[broken("client")],
    ) as (_, client):
        with pytest.raises(polyrpc.RemoteError, match="server middleware broke") as failed:
            await client.call("Counter.hit", metadata={"break": "server"})
        assert (failed.value.type_name, failed.value.code) == ("RuntimeError", "handler_error")
        with pytest.raises(RuntimeError, match="client middleware broke"):
            await client.call("Counter.hit", metadata={"break": "client"})
        assert await client.call("Counter.hit") == 1
        assert not client.is_closed


async def test_middleware_runs_on_the_c_build_and_the_python_reference(endpoint, impl):
    from polyrpc.rpc import connection

    seen: list[str] = []

    async def note(call: Call, call_next: CallNext) -> Any:
        seen.append(call.method)
        return await call_next(call)

    async with rpc(endpoint, Counter(), server_middleware=[note]) as (server, client):
        assert await client.call("Counter.hit") == 1
        (served,) = server.connections
        assert served._request_handler == served.on_request  # the C call server stepped aside
    assert seen == ["Counter.hit"]
    async with rpc(endpoint, Counter()) as (server, client):
        assert await client.call("Counter.hit") == 1
        (served,) = server.connections
        if impl == "c" and connection.EagerServer is not None:  # (none: POLYRPC_PURE_PYTHON)
            # without middleware the C call server stays
            assert isinstance(served._request_handler, connection.EagerServer)
        else:
            assert served._request_handler == served.on_request


async def test_log_calls_logs_both_sides(endpoint, caplog):
    logged = polyrpc.log_calls()
    async with rpc(endpoint, Counter(), server_middleware=[logged], client_middleware=[logged]) as (
        _,
        client,
    ):
        with caplog.at_level(logging.INFO, logger="polyrpc"):
            await client.call("Counter.hit")
            with pytest.raises(polyrpc.RemoteError):
                await client.call("Counter.hold", "not a number")
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("called Counter.hit in ") for m in messages)
    assert any(m.startswith("served Counter.hit in ") for m in messages)
    assert any(m.startswith("served Counter.hold failed after ") for m in messages)


def test_bench_rows_name_the_sides_with_the_pass_through_middleware():
    from polyrpc.bench.rows import resolve_target
    from polyrpc.bench.targets import RpcTarget

    for name, sides in [
        ("tcp/rpc", ()),
        ("tcp/rpc+mw", ("server", "client")),
        ("tcp/rpc+mw=server", ("server",)),
        ("tcp/rpc+mw=client", ("client",)),
    ]:
        target = resolve_target(name)
        assert isinstance(target, RpcTarget)
        assert (target.name, target.middleware_on) == (name, sides)
    with pytest.raises(ValueError, match="unknown benchmark row"):
        resolve_target("tcp/rpc+mw=both")
