"""Chaos: a ``polyrpc serve`` process under mixed load (calls with and without timeouts,
streams, streamed arguments, notifications, callbacks; handlers that raise TimeoutError,
CancelledError, SystemExit, KeyboardInterrupt or sleep) while client processes are killed
and restarted and connections aborted, for a bounded time on each transport (issue #15).

Every call of the clients that survive is accounted for (a checked result or a polyrpc
error, each under an outer bound, so a hang fails the test); at the end the server process
is alive, serves a fresh client, its RSS is bounded and its file descriptors are back.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import polyrpc
from bench.budgets import rss
from tests.chaos_client import Helper, one_call
from tests.conftest import ROOT, SUBPROCESS_ENV, Endpoint, serve_subprocess, subprocess_schemes

CHAOS_SECONDS = 12.0
"""How long the chaos lasts on each transport."""
OUTER = 20.0
"""No call may take longer than this (the longest timeout a call uses is 5 s)."""
VICTIMS = 3
"""Client processes running at any time (each killed and replaced, about every second)."""
WORKERS = 3
"""In-process clients whose connections get aborted now and then; 3 calls at a time each."""
RSS_BOUND = 96 << 20
"""How much the server's RSS may grow from its warmed-up size (generous)."""


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Ledger:
    """Every call the surviving clients issued, and how each ended."""

    def __init__(self) -> None:
        self.issued = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.hangs: list[str] = []
        self.wrong: list[str] = []

    async def call(self, client: polyrpc.Client, rng: random.Random) -> None:
        self.issued += 1
        try:
            name, outcome = await asyncio.wait_for(one_call(client, rng), OUTER)
        except TimeoutError:
            self.hangs.append(f"a call on {client.peer} took over {OUTER} s")
        except Exception as exc:  # a wrong result, or an error that is not a polyrpc one
            self.wrong.append(repr(exc))
        else:
            kind = type(outcome).__name__ if isinstance(outcome, Exception) else "result"
            self.outcomes[f"{name}:{kind}"] += 1

    @property
    def accounted(self) -> int:
        return sum(self.outcomes.values()) + len(self.hangs) + len(self.wrong)


async def worker(url: str, seed: int, ledger: Ledger, until: float) -> None:
    """One client after another (the chaos aborts them); three calls at a time each."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        client = await asyncio.wait_for(polyrpc.connect(url, services=[Helper()]), OUTER)
        aborter = asyncio.get_running_loop().call_later(rng.uniform(0.3, 3.0), client.abort)

        async def calls(client: polyrpc.Client = client) -> None:
            while time.monotonic() < until and not client.is_closed:
                await ledger.call(client, rng)

        await asyncio.gather(*(calls() for _ in range(3)))
        aborter.cancel()
        client.abort()


async def victims(url: str, until: float) -> int:
    """Keep VICTIMS client processes calling; SIGKILL one at random about every second
    and start another. Returns how many were killed."""
    rng = random.Random(7)
    running: list[asyncio.subprocess.Process] = []
    killed = 0
    try:
        while time.monotonic() < until:
            while len(running) < VICTIMS:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(Path(__file__).with_name("chaos_client.py")),
                    url,
                    str(rng.randrange(1 << 30)),
                    stdout=subprocess.DEVNULL,
                    env=SUBPROCESS_ENV,
                    cwd=ROOT,
                )
                running.append(proc)
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            victim = running.pop(rng.randrange(len(running)))
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            killed += 1
    finally:
        for proc in running:
            proc.kill()
            await proc.wait()
    return killed


@pytest.mark.parametrize("chaos_scheme", subprocess_schemes())
def test_chaos(chaos_scheme, tmp_path):
    endpoint = Endpoint(chaos_scheme, tmp_path)
    services = ("tests.rpc_fault_services:Faulty", "tests.rpc_fault_services:Chaos")
    with serve_subprocess(endpoint, *services) as (server, url):

        async def run() -> None:
            warm = Ledger()  # one of everything first, then the baseline
            async with polyrpc.connect(url, services=[Helper()]) as client:
                rng = random.Random(0)
                for _ in range(60):
                    await warm.call(client, rng)
            assert not warm.hangs and not warm.wrong, (warm.hangs, warm.wrong)
            await asyncio.sleep(0.5)
            base_rss, base_fds = rss(server.pid), fds(server.pid)

            ledger = Ledger()
            until = time.monotonic() + CHAOS_SECONDS
            killed, *_ = await asyncio.wait_for(
                asyncio.gather(
                    victims(url, until),
                    *(worker(url, seed, ledger, until) for seed in range(WORKERS)),
                ),
                CHAOS_SECONDS + 2 * OUTER,
            )
            print(
                f"{chaos_scheme}: {ledger.issued} calls, {killed} clients killed:",
                dict(ledger.outcomes),
            )
            assert server.poll() is None, "the server process died"
            assert ledger.issued == ledger.accounted
            assert not ledger.hangs and not ledger.wrong, (ledger.hangs, ledger.wrong)
            assert killed >= CHAOS_SECONDS // 2, killed
            # the surviving clients met every kind of outcome, and not only errors
            assert ledger.outcomes["ping:result"] and ledger.outcomes["callback:result"]
            assert ledger.outcomes["exit:RemoteError"], ledger.outcomes

            async with polyrpc.connect(url, services=[Helper()]) as client:  # a fresh client
                assert await client.call("Faulty.ping", timeout=OUTER) == "alive"
                assert await client.call("Chaos.ask_client", 21, timeout=OUTER) == 42
            grown = rss(server.pid) - base_rss
            print(f"{chaos_scheme}: server RSS {base_rss >> 20} MiB, +{grown >> 10} KiB")
            assert grown < RSS_BOUND, f"server RSS grew by {grown >> 20} MiB"
            for _ in range(250):  # killed clients' connections are noticed and freed
                if fds(server.pid) <= base_fds + 2:
                    break
                await asyncio.sleep(0.1)
            assert fds(server.pid) <= base_fds + 2, (fds(server.pid), base_fds)

        asyncio.run(run())
        assert server.poll() is None, "the server process ended"
