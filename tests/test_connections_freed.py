"""A connection that ends is freed at once, without the cyclic garbage collector.

Clients connect, start a call and drop the connection mid-call, thousands of times, with
the cyclic GC disabled: no session or stream of theirs may stay behind (in-process, over
every transport and both codec paths), and a real server's RSS stays flat (subprocess,
RSS from /proc). See docs/architecture.md ("What a peer can cost you").
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import polyrpc
from bench.budgets import rss
from polyrpc.errors import ConnectionLost
from polyrpc.session.session import Session
from polyrpc.stream.registry import registry
from polyrpc.stream.trait import Stream
from tests.test_conformance import HELLO, Recorder

ROUNDS = {"tcp": 2000, "unix": 2000, "mem": 2000, "tls": 300, "quic": 100, "kcp": 200}
"""Connections opened and aborted per transport (the slower handshakes get fewer)."""


class Work:
    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    async def quick(self) -> str:
        return "quick"


def _connection_objects() -> int:
    """Sessions and streams alive now, found without collecting anything."""
    return sum(1 for o in gc.get_objects() if isinstance(o, Session | Stream))


async def _abort_mid_call(url: str) -> None:
    client = await polyrpc.connect(url)
    call = asyncio.ensure_future(client.call("Work.slow", 0.01))
    await asyncio.sleep(0)  # the request is written; the handler is running or about to
    client.abort()
    # (not `await call`: raising the error here would put this frame, which holds the task
    # that holds the error, on its traceback: a cycle of the test's own)
    await asyncio.wait([call])
    assert isinstance(call.exception(), polyrpc.ConnectionLost)
    await client.wait_closed()


async def _wait_until_gone(server: polyrpc.Server) -> None:
    deadline = time.monotonic() + 30
    while server.connections or server._admitting:
        assert time.monotonic() < deadline, "the server kept connections"
        await asyncio.sleep(0.01)


async def test_aborted_connections_are_freed_without_the_gc(endpoint, impl):
    rounds = ROUNDS.get(endpoint.scheme, 100)
    async with polyrpc.serve(endpoint.listen_url, Work()) as server:
        url = endpoint.client_url(server.urls[0])
        for _ in range(3):  # warm up: imports, caches, the listener's own objects
            await _abort_mid_call(url)
        await _wait_until_gone(server)
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            before = _connection_objects()
            for _ in range(rounds):
                await _abort_mid_call(url)
            await _wait_until_gone(server)
            await asyncio.sleep(0.1)  # let closing handles run
            left = _connection_objects() - before
            print(f"{endpoint.scheme}/{impl}: {rounds} aborted connections, {left} objects left")
            assert left <= 4, f"{left} sessions/streams of {rounds} connections wait for the GC"
        finally:
            gc.enable()
            gc.unfreeze()


SERVER = """
import gc, sys
gc.disable()
from polyrpc.cli import main
sys.exit(main(["serve", sys.argv[1], "--object", "test_connections_freed:WORK"]))
"""
WORK = Work()


def _rss_mib(pid: int) -> float:
    return rss(pid) / (1 << 20)


@pytest.mark.parametrize("pure_python", ["0", "1"], ids=["c", "python"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_a_real_server_without_gc_keeps_flat_rss(kind, pure_python, tmp_path):
    listen = "tcp@127.0.0.1:0" if kind == "tcp" else f"unix@{tmp_path}/s.sock"
    env = dict(os.environ, POLYRPC_PURE_PYTHON=pure_python, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, listen], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        url = proc.stdout.readline().split()[-1]
        for _ in range(100):
            await _abort_mid_call(url)
        await asyncio.sleep(0.5)
        base = _rss_mib(proc.pid)
        rounds = 1500
        for _ in range(rounds):
            await _abort_mid_call(url)
        await asyncio.sleep(0.5)
        grown = _rss_mib(proc.pid) - base
        print(
            f"{kind}/{'python' if pure_python == '1' else 'c'}: server RSS +{grown:.1f} MiB "
            f"after {rounds} aborted connections without GC"
        )
        # each connection held ~0.5 MiB while cycles kept it alive: 1500 of them, ~700 MiB
        assert grown < 60
    finally:
        proc.kill()
        proc.wait()


class _Served:
    """Arith-like service for the slot tests."""

    async def add(self, a: int, b: int) -> int:
        return a + b


@pytest.mark.parametrize("side", ["rpc", "messages"])
async def test_a_slot_is_free_the_moment_its_connection_is_gone(side):
    """A connection lost mid-handshake (or after it) is counted until its task wakes, a few
    loop turns later; a newcomer in between must not be refused for it. mem@ dials
    synchronously, so the newcomer arrives in the same loop turn as the loss."""
    if side == "rpc":
        server = await polyrpc.serve(
            "mem@0", _Served(), max_handshaking=1, max_connections=2, handshake_timeout=30
        )
        url, handshaking = server.urls[0], server.handshaking
    else:
        server = await polyrpc.listen("mem@0", max_handshaking=1, handshake_timeout=30)
        url, handshaking = server.url, server.gate.handshaking
    transport, address = registry.resolve(url)
    try:
        silent = await transport.dial(address)
        silent.set_receiver(Recorder())
        await silent.send([HELLO[:10]])
        for _ in range(100):
            if handshaking:
                break
            await asyncio.sleep(0.01)
        (stuck,) = handshaking
        stuck.abort(ConnectionLost("the peer vanished"))
        newcomer = await transport.dial(address)  # no loop turn since the abort
        newcomer.set_receiver(recorder := Recorder())
        assert not recorder.lost.is_set() and not recorder.data, "refused for a gone peer"
        assert len(handshaking) == 1 and next(iter(handshaking)) is not stuck
        newcomer.abort()
        if side == "rpc":  # max_connections: two served, one lost, a third arrives
            clients = [await polyrpc.connect(url) for _ in range(2)]
            gone = next(c for c in server.connections if c.peer_info)
            gone.abort(ConnectionLost("the peer vanished"))
            third = await transport.dial(address)
            third.set_receiver(recorder := Recorder())
            await third.send([HELLO])  # a refusal is decided at accept, said to the HELLO
            for _ in range(200):
                if recorder.data:
                    break
                await asyncio.sleep(0.01)
            assert recorder.data and b"too_many_connections" not in recorder.data
            third.abort()
            for client in clients:
                client.abort()
    finally:
        await server.close()
