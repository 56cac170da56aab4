"""The mixed load of tests/test_chaos.py: random calls against a server of
``tests.rpc_fault_services`` (Faulty and Chaos), each ending in a checked result or a
polyrpc error.

Usage: python tests/chaos_client.py URL SEED  -> prints "ready", then calls until killed.
The test also imports :func:`one_call` for its own clients, whose every call it accounts for.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import polyrpc


class Helper:
    """What the server calls back (``Chaos.ask_client``)."""

    def double(self, x: int) -> int:
        return 2 * x


class SourceBroke(Exception):
    """Raised by a streamed argument; the call fails with it (the argument's own error)."""


async def numbers(count: int, fail: bool) -> AsyncIterator[int]:
    """A streamed argument, maybe one that raises half way."""
    for i in range(count):
        if fail and i == count // 2:
            raise SourceBroke("the argument stream broke")
        yield i
        await asyncio.sleep(0)


async def _stream(client: polyrpc.Client, count: int) -> list[int]:
    items: list[int] = []
    async for item in client.stream("Chaos.ticks", 0.002, timeout=5.0):
        items.append(item)
        if len(items) == count:
            break
    return items


def _choose(client: polyrpc.Client, rng: random.Random) -> tuple[str, Awaitable[Any], Any]:
    """A random call: (name, awaitable, the right result, or None when only an error is)."""
    x, count, delay = rng.randrange(1000), rng.randrange(1, 20), rng.uniform(0, 0.2)
    fail, suspend = rng.random() < 0.3, rng.random() < 0.5
    calls: list[tuple[str, Callable[[], Awaitable[Any]], Any]] = [
        ("ping", lambda: client.call("Faulty.ping", timeout=5.0), "alive"),
        ("own_timeout", lambda: client.call("Faulty.own_timeout", timeout=5.0), None),
        ("eager_timeout", lambda: client.call("Faulty.eager_timeout"), None),
        ("inner_cancelled", lambda: client.call("Faulty.inner_cancelled"), None),
        ("eager_cancelled", lambda: client.call("Faulty.eager_cancelled"), None),
        ("exit", lambda: client.call("Faulty.exit", suspend), None),
        ("interrupt", lambda: client.call("Faulty.interrupt", suspend), None),
        ("sync_exit", lambda: client.call("Faulty.sync_exit"), None),
        ("wait", lambda: client.call("Chaos.wait", delay, timeout=rng.choice([0.05, 2.0])), "done"),
        ("stream", lambda: _stream(client, count), list(range(count))),
        ("total", lambda: client.call("Chaos.total", numbers(count, fail), timeout=5.0), (
            None if fail else sum(range(count))
        )),
        ("notify", lambda: client.notify("Chaos.note", fail), None),
        ("callback", lambda: client.call("Chaos.ask_client", x, timeout=5.0), 2 * x),
    ]  # fmt: skip
    name, make, expected = calls[rng.randrange(len(calls))]
    return name, make(), expected


async def one_call(client: polyrpc.Client, rng: random.Random) -> tuple[str, Any]:
    """Make one random call: (its name, the checked result or the PolyrpcError it ended
    with, or its streamed argument's error). A wrong result, or any other exception, raises."""
    name, call, expected = _choose(client, rng)
    try:
        result = await call
    except (polyrpc.PolyrpcError, SourceBroke) as exc:
        return name, exc
    if result != expected:
        raise AssertionError(f"{name} returned {result!r}, expected {expected!r}")
    return name, result


async def main(url: str, seed: int) -> None:
    """Calls from four tasks at once on one connection until killed."""
    rng = random.Random(seed)
    client = await polyrpc.connect(url, services=[Helper()])
    print("ready", flush=True)

    async def loop() -> None:
        while True:
            await one_call(client, rng)

    await asyncio.gather(*(loop() for _ in range(4)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
