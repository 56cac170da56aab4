"""The etcd discovery backend and registration against a real etcd (Debian's etcd-server),
started on free loopback ports with its data in a temporary folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import polyrpc
from polyrpc.cluster import ClusterClient, RegisteredServer
from tests.conftest import SUBPROCESS_ENV
from tests.test_cluster import Worker, wait_until

ENV = SUBPROCESS_ENV
HOW_TO_RUN = (
    "these tests need etcd and aetcd: `apt-get install etcd-server` (scripts/setup.sh does it "
    "where apt exists) and `pip install 'polyrpc[etcd]'`"
)


def etcd_binary() -> str:
    """The etcd binary, or skip (fail under CI=true, where these tests must run)."""
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    try:
        import aetcd  # noqa: F401
    except ImportError:
        binary = None
    if binary is None:
        if os.environ.get("CI") == "true":  # as scripts/test.sh reads it
            pytest.fail(HOW_TO_RUN)
        pytest.skip(HOW_TO_RUN)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Etcd:
    """One etcd process on loopback ports, with its data in ``data``; stop and start it
    again (same ports, same data) to test what survives an etcd restart."""

    def __init__(self, data: Path) -> None:
        self.binary = etcd_binary()
        self.data = data
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        with open(self.data / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--name=test",
                    f"--data-dir={self.data / 'data'}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=test={peer_url}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.data / "etcd.log").read_text()[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "etcd did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory) -> Iterator[str]:
    """A fresh etcd on loopback for this module's tests; yields its address ``host:port``."""
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server.address
    finally:
        server.stop()


async def test_registered_servers_are_found_and_leave_on_close(etcd):
    name = f"etcd://{etcd}/arith"
    first = await polyrpc.serve("tcp@127.0.0.1:0", ("Worker", Worker("s0")), register=name)
    assert isinstance(first, RegisteredServer)
    try:
        async with polyrpc.connect(name, timeout=5) as client:
            assert isinstance(client, ClusterClient)
            assert await client.call("Worker.whoami", timeout=5) == "s0"
            async with polyrpc.serve(
                "tcp@127.0.0.1:0", ("Worker", Worker("s1")), register=name, ttl=3
            ) as second:
                assert second.instance is not None
                await wait_until(lambda: len(client.live()) == 2)
                names = {await client.call("Worker.whoami") for _ in range(6)}
                assert names == {"s0", "s1"}
                assert client.members[second.instance.id].url == second.urls[0]
            # closed: deregistered at once (its lease revoked), not after the ttl
            started = time.monotonic()
            await wait_until(lambda: len(client.members) == 1, timeout=2)
            assert time.monotonic() - started < 1
            assert {await client.call("Worker.whoami") for _ in range(3)} == {"s0"}
    finally:
        await first.close()


async def test_a_client_started_first_waits_for_the_first_server(etcd):
    name = f"etcd://{etcd}/late"
    async with polyrpc.connect(name, timeout=5) as client:
        assert client.members == {}
        call = asyncio.ensure_future(client.call("Worker.whoami", timeout=5))
        await asyncio.sleep(0.2)
        async with polyrpc.serve("tcp@127.0.0.1:0", ("Worker", Worker("s0")), register=name):
            assert await call == "s0"


async def test_a_killed_server_disappears_when_its_lease_expires(etcd, tmp_path):
    """`polyrpc serve --register` in a process killed with SIGKILL (`polyrpc call` finds
    it by name first): no deregistration, so the lease's end removes it, within ttl + 1 s."""
    name = f"etcd://{etcd}/crash"
    ttl = 2
    command = [sys.executable, "-m", "polyrpc.cli", "serve", "tcp@127.0.0.1:0", "--demo"]
    proc = subprocess.Popen(
        [*command, "--register", name, "--ttl", str(ttl)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        while not (line := proc.stdout.readline()).startswith("registered at"):
            assert line, f"serve exited early: {proc.stderr.read() if proc.stderr else ''}"
        called = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "polyrpc.cli", "call", name, "Demo.add", "2", "3"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert (called.returncode, called.stdout.strip()) == (0, "5"), called.stderr
        async with polyrpc.connect(name, timeout=5) as client:
            assert await client.call("Demo.add", 2, 3, timeout=5) == 5
            await asyncio.sleep(ttl)  # past a keepalive or two: the lease is being refreshed
            assert len(client.members) == 1
            proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await wait_until(lambda: not client.live(), timeout=1)  # marked down at once
            await wait_until(lambda: not client.members, timeout=ttl + 2)
            assert time.monotonic() - killed <= ttl + 1
    finally:
        proc.kill()
        proc.wait()


async def test_registering_needs_a_reachable_etcd():
    etcd_binary()  # aetcd is needed here too
    port = free_port()
    with pytest.raises(polyrpc.ConnectFailed):
        await polyrpc.serve(
            "tcp@127.0.0.1:0", Worker("s0"), register=f"etcd://127.0.0.1:{port}/none"
        )


async def test_clients_and_registrations_outlive_an_etcd_restart(tmp_path):
    """While etcd is down the client keeps its list and its calls work; once it is back,
    the watch resumes (a server registered then is found) and the old lease still holds."""
    etcd = Etcd(tmp_path)
    etcd.start()
    name = f"etcd://{etcd.address}/restart"
    try:
        async with (
            polyrpc.serve("tcp@127.0.0.1:0", ("Worker", Worker("s0")), register=name, ttl=2),
            polyrpc.connect(name, timeout=5) as client,
        ):
            assert await client.call("Worker.whoami", timeout=5) == "s0"
            etcd.stop()
            await asyncio.sleep(1)
            assert await client.call("Worker.whoami", timeout=5) == "s0"
            etcd.start()
            async with polyrpc.serve(
                "tcp@127.0.0.1:0", ("Worker", Worker("s1")), register=name, ttl=2
            ):
                await wait_until(lambda: len(client.live()) == 2, timeout=10)
                await asyncio.sleep(3)  # past the first server's ttl: its keepalive goes on
                assert len(client.members) == 2
    finally:
        etcd.stop()


async def test_a_group_of_workers_is_registered_once(etcd, tmp_path):
    """`polyrpc serve --workers 2 --register`: one entry for the group (its supervisor
    registers it), answered by both workers, and gone at once when the group stops."""
    name = f"etcd://{etcd}/group"
    command = [sys.executable, "-m", "polyrpc.cli", "serve", "tcp@127.0.0.1:0", "--demo"]
    proc = subprocess.Popen(
        [*command, "--workers", "2", "--register", name, "--ttl", "5"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        while not (line := proc.stdout.readline()).startswith("methods:"):
            assert line, "serve exited early"
        async with polyrpc.connect(name, timeout=5) as client:
            await wait_until(lambda: len(client.members) == 1)
            (member,) = client.members.values()
            assert member.url.startswith("tcp@127.0.0.1:") and "reuse_port" not in member.url
            workers = set()
            for _ in range(30):  # a fresh connection each: both workers answer
                async with await polyrpc.connect(member.url) as direct:
                    workers.add((await direct.call("_sys.stats"))["worker"])
            assert workers == {0, 1}
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            await wait_until(lambda: not client.members, timeout=3)
            assert time.monotonic() - started < 1.5  # deregistered, not left to expire
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.kill()
        proc.wait()
