"""Handlers that misbehave, for tests/test_rpc_faults.py and tests/test_chaos.py (also served by a real
``polyrpc serve`` subprocess there: ``tests.rpc_fault_services:Faulty``)."""

from __future__ import annotations

import asyncio
import threading
import time

import polyrpc


class Faulty:
    """Each method raises something a handler should not be able to lose a reply with."""

    async def own_timeout(self) -> None:
        """A TimeoutError of the handler's own (an inner wait_for), after suspending."""
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    async def eager_timeout(self) -> None:
        """The same without suspending first (the eager first step)."""
        raise TimeoutError("inner deadline")

    async def inner_cancelled(self) -> None:
        """A CancelledError from a task the handler awaited, not from its caller."""
        inner = asyncio.ensure_future(asyncio.sleep(10))
        asyncio.get_running_loop().call_later(0.01, inner.cancel)
        await inner

    async def eager_cancelled(self) -> None:
        raise asyncio.CancelledError("cancelled inside")

    async def exit(self, suspend: bool) -> None:
        if suspend:
            await asyncio.sleep(0.01)
        raise SystemExit(3)

    async def interrupt(self, suspend: bool) -> None:
        if suspend:
            await asyncio.sleep(0.01)
        raise KeyboardInterrupt

    def sync_exit(self) -> None:
        raise SystemExit(4)

    def sync_interrupt(self) -> None:
        raise KeyboardInterrupt

    def block(self, seconds: float) -> str:
        """A sync handler that holds its thread."""
        time.sleep(seconds)
        return "unblocked"

    async def ping(self) -> str:
        return "alive"


class Gated:
    """Sync handlers that block until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.notified: list[str] = []
        self.noted = threading.Event()

    def hold(self) -> str:
        self.entered.release()
        self.gate.wait(30)
        return threading.current_thread().name

    def note(self) -> None:
        """A sync notification handler: records the thread it ran on."""
        self.notified.append(threading.current_thread().name)
        self.noted.set()

    async def quick(self) -> str:
        return "quick"


class Slow:
    """A slow handler that records how it ended (also used by tests/test_rpc_conformance.py)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def wait(self, seconds: float, payload: bytes = b"") -> str:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "done"


class Guarded(Slow):
    """Slow handlers, one of them taking a streamed argument, that record how they ended."""

    async def total(self, numbers) -> int:
        self.started.set()
        try:
            return sum([n async for n in numbers])
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def ticks(self, interval: float):
        """Yield forever, ``interval`` seconds apart."""
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(interval)


class Chaos(Guarded):
    """Guarded's slow, streaming and streamed-argument handlers plus a callback and a
    notification that sometimes fails, for the mixed load of tests/test_chaos.py."""

    async def ask_client(self, x: int) -> int:
        """Call the caller back (its ``Helper.double``) over the same connection."""
        return await polyrpc.current_context().call("Helper.double", x)

    async def note(self, fail: bool) -> None:
        """A notification handler; a failing one is only logged by the server."""
        await asyncio.sleep(0)
        if fail:
            raise ValueError("the notification handler failed")
