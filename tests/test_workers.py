"""``polyrpc serve --workers N``: real supervisor and worker processes on shared ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import polyrpc

START_TIMEOUT = 60.0


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyrpc.cli", "serve", *args]


class Served:
    """A ``polyrpc serve --workers`` supervisor running in a subprocess."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            serve_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.urls: list[str] = []

    def read_until(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Read output lines until one matches ``pattern`` (fails on exit or timeout)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"exited before {pattern!r}: {''.join(self.lines)}")
            self.lines.append(line)
            if line.startswith("serving on "):
                self.urls.append(line.split()[-1])
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no {pattern!r} in {timeout}s: {''.join(self.lines)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            assert self.process.stdout is not None
            self.lines += self.process.stdout.readlines()


@pytest.fixture
def served(request):
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(*args)
        started.append(served)
        served.read_until("^methods: ")
        return served

    yield start
    for served in started:
        served.stop()


async def workers_seen(url: str, connections: int = 24) -> dict[int, int]:
    """worker number -> pid, from ``_sys.stats`` over fresh connections."""
    seen: dict[int, int] = {}
    for _ in range(connections):
        async with await polyrpc.connect(url) as client:
            stats = await client.call("_sys.stats")
            seen[stats["worker"]] = stats["pid"]
    return seen


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's child processes."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children}


def listening_unix_inode(path: Path) -> str:
    """The inode of the listening unix socket bound to ``path`` (from /proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        accepting = int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
        if len(fields) == 8 and fields[7] == str(path) and accepting:
            return fields[6]
    raise AssertionError(f"nobody listens on {path}")


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("kind", ["tcp", "unix", "kcp", "quic"])
async def test_every_worker_serves_the_shared_url(served, kind, tmp_path):
    url = f"unix@{tmp_path / 'w.sock'}" if kind == "unix" else f"{kind}@127.0.0.1:0"
    server = served(url, "--demo", "--workers", "3")
    (dial,) = server.urls
    if kind == "quic":
        dial += "?fingerprint=" + re.search(r"SHA-256 (\S+)", "".join(server.lines)).group(1)
    seen = await workers_seen(dial, 40)
    if kind == "unix":  # one shared accept queue: whichever worker wakes first takes each
        children = worker_pids(server.process.pid)
        assert len(children) == 3 and set(seen.values()) <= children
        listening = listening_unix_inode(tmp_path / "w.sock")
        assert all(listening in socket_inodes(pid) for pid in children)
        seen = {number: pid for number, pid in zip(range(3), sorted(children), strict=True)}
    else:  # SO_REUSEPORT hashes each connection: 40 all on 2 of 3 has p < 1e-6
        assert sorted(seen) == [0, 1, 2], seen
    assert len(set(seen.values())) == 3
    assert server.stop() == 0
    assert not any(alive(pid) for pid in seen.values())
    if kind == "unix":
        assert not (tmp_path / "w.sock").exists()


async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(served):
    server = served("tcp@127.0.0.1:0", "--demo", "--workers", "2")
    (url,) = server.urls
    before = await workers_seen(url)
    assert sorted(before) == [0, 1]
    os.kill(before[1], signal.SIGKILL)
    server.read_until(rf"worker 1 \(pid {before[1]}\) exited with status -9; restarting")
    deadline = time.monotonic() + 30
    while True:
        after = await workers_seen(url, 8)  # no call fails meanwhile: worker 0 answers
        if after.get(1, before[1]) != before[1] or time.monotonic() > deadline:
            break
    assert after[1] != before[1] and after.get(0, before[0]) == before[0]
    assert alive(after[1]) and not alive(before[1])


async def test_sigterm_lets_calls_in_flight_finish(served):
    server = served("tcp@127.0.0.1:0", "--demo", "--workers", "2")
    (url,) = server.urls
    pids = set((await workers_seen(url)).values())
    async with await polyrpc.connect(url) as client:
        slow = asyncio.create_task(client.call("Demo.sleep", 1.0))
        await asyncio.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        assert await slow == 1.0
    assert await asyncio.to_thread(server.process.wait, 30) == 0
    assert not any(alive(pid) for pid in pids)


async def test_sighup_replaces_every_worker_and_a_call_retried_on_a_new_connection_succeeds(
    served,
):
    """Workers are replaced one by one while clients keep connecting. A fresh connection
    that a draining worker accepted just before it stopped is closed by its graceful close
    (GOAWAY carries no "last request served", so the call on it fails as ConnectionLost);
    the same call on a new connection then succeeds: the group keeps serving throughout."""
    server = served("tcp@127.0.0.1:0", "--demo", "--workers", "2")
    (url,) = server.urls
    before = await workers_seen(url)

    async def add_on_a_fresh_connection(n: int) -> int:
        for _ in range(2):  # the connection dies before the answer: again, on a new one
            with contextlib.suppress(polyrpc.ConnectionLost, polyrpc.HandshakeError):
                async with await polyrpc.connect(url) as client:
                    return await client.call("Demo.add", n, 1)
        async with await polyrpc.connect(url) as client:
            return await client.call("Demo.add", n, 1)

    async with await polyrpc.connect(url) as old_client:
        in_flight = asyncio.create_task(old_client.call("Demo.sleep", 1.0))
        await asyncio.sleep(0.1)
        server.process.send_signal(signal.SIGHUP)
        restarted = asyncio.create_task(asyncio.to_thread(server.read_until, "workers restarted"))
        calls = 0
        while not restarted.done():  # fresh connections all along
            assert await add_on_a_fresh_connection(calls) == calls + 1
            calls += 1
        await restarted
        assert await in_flight == 1.0  # the old worker drained it
    after = await workers_seen(url)
    assert sorted(after) == [0, 1] and not set(after.values()) & set(before.values())
    assert calls > 0


def test_a_transport_that_cannot_be_shared_is_refused():
    done = subprocess.run(
        serve_command("mem@x", "--demo", "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot share a listener between processes" in done.stderr


@pytest.mark.parametrize(("count", "why"), [("0", "at least 1"), ("many", "or 'auto'")])
def test_a_bad_worker_count_is_refused(count, why):
    done = subprocess.run(
        serve_command("tcp@127.0.0.1:0", "--demo", "--workers", count),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and why in done.stderr


def test_a_worker_that_cannot_start_stops_the_supervisor():
    """Worker 0 cannot bind (a listener without SO_REUSEPORT holds the port): the
    supervisor says so and exits, leaving no worker behind."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            serve_command(f"tcp@127.0.0.1:{port}", "--demo", "--workers", "2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "address already in use" in done.stderr
    assert "worker 0 exited with status 1 before serving" in done.stderr


def test_an_object_that_cannot_be_loaded_is_reported_before_any_worker_starts(tmp_path: Path):
    done = subprocess.run(
        serve_command("tcp@127.0.0.1:0", "no_such_module:Thing", "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1 and "cannot load 'no_such_module:Thing'" in done.stderr
    assert "worker" not in done.stderr


async def test_workers_leave_when_their_supervisor_is_killed(served):
    server = served("tcp@127.0.0.1:0", "--demo", "--workers", "2")
    (url,) = server.urls
    pids = set((await workers_seen(url)).values())
    server.process.kill()  # no chance to tell the workers: they see their stdin end
    server.process.wait(10)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
