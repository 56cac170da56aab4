"""The cluster client (polyrpc/cluster/) against real servers: discovery by list://,
transport preference, selectors, fail modes, health and reconnection."""

from __future__ import annotations

import asyncio
import collections
import time
from importlib.metadata import EntryPoint

import pytest

import polyrpc
from polyrpc.cluster import (
    ClusterClient,
    StaticDiscovery,
    choose_url,
    discovery,
    discovery_registry,
)
from polyrpc.cluster.discovery import Discovery, Instance
from polyrpc.cluster.health import Backoff, CircuitBreaker
from polyrpc.errors import CallTimeout, ConnectFailed, ConnectionLost, RemoteError


class Worker:
    """A service that says which server ran it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.notes: list[str] = []
        self.release = asyncio.Event()
        self.release.set()

    async def whoami(self) -> str:
        self.calls += 1
        return self.name

    async def slow(self, seconds: float) -> str:
        self.calls += 1
        await asyncio.sleep(seconds)
        return self.name

    async def held(self) -> str:
        """Waits until the test releases it: keeps calls in flight on this server."""
        self.calls += 1
        await self.release.wait()
        return self.name

    async def note(self, text: str) -> None:
        self.notes.append(text)

    async def fail(self) -> None:
        raise ValueError(f"failed on {self.name}")

    async def count(self, n: int):
        for i in range(n):
            yield f"{self.name}:{i}"

    async def ask_back(self) -> str:
        return await polyrpc.current_context().call("Client.name")


class Servers:
    """Several real servers, each with its Worker; stop/start one by index."""

    def __init__(self) -> None:
        self.servers: list[polyrpc.Server | None] = []
        self.workers: list[Worker] = []
        self.urls: list[str] = []

    async def start(self, count: int, url: str = "tcp@127.0.0.1:0") -> Servers:
        for _ in range(count):
            worker = Worker(f"s{len(self.workers)}")
            server = await polyrpc.serve(url, ("Worker", worker))
            self.servers.append(server)
            self.workers.append(worker)
            self.urls.append(server.urls[0])
        return self

    @property
    def list_url(self) -> str:
        return "list://" + ",".join(self.urls)

    async def stop(self, index: int) -> None:
        server = self.servers[index]
        assert server is not None
        self.servers[index] = None
        await server.close()

    async def restart(self, index: int) -> None:
        assert self.servers[index] is None
        server = await polyrpc.serve(self.urls[index], ("Worker", self.workers[index]))
        self.servers[index] = server

    async def close(self) -> None:
        for index, server in enumerate(self.servers):
            if server is not None:
                await self.stop(index)


@pytest.fixture
async def servers():
    group = Servers()
    yield group
    await group.close()


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_list_urls_parse_into_instances():
    discovery = discovery_registry.open("list://tcp@h1:1|unix@/run/a.sock, kcp@h2:2")
    assert isinstance(discovery, StaticDiscovery)
    assert [i.urls for i in discovery.instances] == [
        ("tcp@h1:1", "unix@/run/a.sock"),
        ("kcp@h2:2",),
    ]
    with pytest.raises(polyrpc.InvalidAddress):
        discovery_registry.open("list://")
    with pytest.raises(polyrpc.InvalidAddress, match="unknown discovery scheme"):
        discovery_registry.open("zookeeper://h/x")


class OneServer(Discovery):
    """A third party's backend, loaded through the entry point below."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def watch(self):
        yield [Instance("only", ("tcp@127.0.0.1:1",))]


def test_a_plugin_backend_is_loaded_from_its_entry_point(monkeypatch):
    plugin = EntryPoint("fixed", f"{__name__}:OneServer", "polyrpc.discovery")
    monkeypatch.setattr(
        discovery, "entry_points", lambda group: [plugin] if group == plugin.group else []
    )
    backends = discovery.DiscoveryRegistry()
    assert "fixed" in backends.schemes() and {"list", "etcd", "dns"} <= set(backends.schemes())
    assert backends.handles("fixed://anything")
    assert not backends.handles("tcp://127.0.0.1:1")
    opened = backends.open("fixed://anything")
    assert isinstance(opened, OneServer) and opened.url == "fixed://anything"


def test_transport_preference():
    local = ("tcp@127.0.0.1:1", "unix@/tmp/x.sock", "quic@127.0.0.1:2")
    assert choose_url(local) == "unix@/tmp/x.sock"
    assert choose_url(local, prefer := ("quic", "tcp")) == "quic@127.0.0.1:2", prefer
    remote = ("tcp@192.0.2.7:1", "unix@/tmp/x.sock")
    assert choose_url(remote) == "tcp@192.0.2.7:1"  # a unix socket reaches only this host
    assert choose_url(("zzz@h:1",)) is None


async def test_a_server_offering_several_transports_is_dialled_by_preference():
    async with polyrpc.serve(["tcp@127.0.0.1:0", "mem@0"], ("Worker", Worker("s0"))) as server:
        tcp_url, mem_url = server.urls
        offer = "list://" + "|".join(server.urls)
        async with polyrpc.connect(offer) as client:
            (member,) = client.members.values()
            assert member.url == mem_url and member.connection is not None
            assert member.connection.transport == "mem"
            assert await client.call("Worker.whoami") == "s0"
        async with polyrpc.connect(offer, prefer=["tcp"]) as client:
            (member,) = client.members.values()
            assert member.url == tcp_url and member.connection is not None
            assert member.connection.transport == "tcp"


async def test_connect_to_a_list_calls_every_server_in_turn(servers):
    await servers.start(3)
    async with polyrpc.connect(servers.list_url) as client:
        assert isinstance(client, ClusterClient)
        names = [await client.call("Worker.whoami") for _ in range(30)]
        assert collections.Counter(names) == {"s0": 10, "s1": 10, "s2": 10}
        assert await client.proxy("Worker").whoami() in {"s0", "s1", "s2"}
        items = [item async for item in client.stream("Worker.count", 3)]
        assert [item.split(":")[1] for item in items] == ["0", "1", "2"]
        with pytest.raises(RemoteError, match="failed on"):
            await client.call("Worker.fail")
        for n in range(6):
            await client.notify("Worker.note", str(n))
        await wait_until(lambda: sum(len(w.notes) for w in servers.workers) == 6)
        assert all(len(w.notes) == 2 for w in servers.workers)  # round robin too


async def test_callbacks_are_served_on_every_connection(servers):
    await servers.start(2)

    class Client:
        async def name(self) -> str:
            return "the client"

    async with polyrpc.connect(servers.list_url, services=[Client()]) as client:
        assert await client.broadcast("Worker.ask_back") == {
            servers.urls[0]: "the client",
            servers.urls[1]: "the client",
        }


async def test_dns_finds_the_servers_a_name_resolves_to(servers):
    await servers.start(1)
    port = servers.urls[0].rsplit(":", 1)[1]
    async with polyrpc.connect(f"dns://localhost:{port}?interval=0.2") as client:
        assert f"tcp@127.0.0.1:{port}" in client.members
        assert await client.call("Worker.whoami", timeout=2) == "s0"


async def test_random_spreads_calls(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, select="random") as client:
        names = collections.Counter([await client.call("Worker.whoami") for _ in range(200)])
        assert set(names) == {"s0", "s1"} and min(names.values()) > 50, names


async def test_weighted_follows_the_weights(servers):
    await servers.start(2)
    discovery = StaticDiscovery(
        [Instance("heavy", (servers.urls[0],), weight=3), Instance("light", (servers.urls[1],))]
    )
    async with await ClusterClient(discovery, select="weighted").start() as client:
        names = collections.Counter([await client.call("Worker.whoami") for _ in range(40)])
        assert names == {"s0": 30, "s1": 10}


async def test_consistent_hash_keeps_a_key_on_its_server(servers):
    await servers.start(3)
    async with polyrpc.connect(servers.list_url, select="consistent_hash") as client:
        keys = [f"user-{n}" for n in range(60)]
        owner = {key: await client.call("Worker.whoami", key=key) for key in keys}
        assert len(set(owner.values())) == 3  # the keys spread
        again = {key: await client.call("Worker.whoami", key=key) for key in keys}
        assert again == owner
        await servers.stop(1)
        await wait_until(lambda: len(client.live()) == 2)
        after = {key: await client.call("Worker.whoami", key=key) for key in keys}
        moved = {key for key in keys if after[key] != owner[key]}
        assert moved == {key for key in keys if owner[key] == "s1"}  # only the gone server's
        with pytest.raises(ValueError, match="needs a key"):
            await client.call("Worker.whoami")


async def test_least_loaded_prefers_the_idle_server(servers):
    await servers.start(2)
    busy = servers.workers[0]
    busy.release.clear()
    async with polyrpc.connect(servers.list_url, select="least_loaded") as client:
        s0 = client.members[servers.urls[0]]
        held = [asyncio.ensure_future(s0.call("Worker.held", (), {}, None, None)) for _ in range(5)]
        await wait_until(lambda: busy.calls == 5)
        names = collections.Counter([await client.call("Worker.whoami") for _ in range(20)])
        assert names == {"s1": 20}
        busy.release.set()
        assert await asyncio.gather(*held) == ["s0"] * 5


async def test_failover_moves_to_a_live_server_within_the_deadline(servers):
    await servers.start(3)
    async with polyrpc.connect(servers.list_url, on_failure="failover") as client:
        await servers.stop(0)
        # every call succeeds: the one that meets the stopped server is retried elsewhere
        names = [await client.call("Worker.whoami", timeout=2) for _ in range(12)]
        assert set(names) <= {"s1", "s2"}
        assert not client.members[servers.urls[0]].live


def busy_member(client: ClusterClient):
    """The one server with a call in flight."""
    (member,) = [m for m in client.members.values() if m.in_flight]
    return member


async def lose_a_call_midway(client: ClusterClient, idempotent: bool) -> tuple[str, asyncio.Future]:
    """Start a slow call, then cut its server's connection: (that server's name, the call)."""
    await wait_until(lambda: len(client.live()) == len(client.members))
    call = asyncio.ensure_future(client.call("Worker.slow", 0.5, idempotent=idempotent))
    await wait_until(lambda: any(m.in_flight for m in client.members.values()))
    victim = busy_member(client)
    assert victim.connection is not None
    victim.connection.abort()
    return victim.id, call


async def test_failover_retries_a_call_lost_midway_only_if_idempotent(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, on_failure="failover") as client:
        _, call = await lose_a_call_midway(client, idempotent=False)
        with pytest.raises(ConnectionLost):
            await call
        victim, call = await lose_a_call_midway(client, idempotent=True)
        survivor = 1 - servers.urls.index(victim)
        assert await call == f"s{survivor}"


async def test_methods_declared_idempotent_are_retried(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, idempotent=["Worker.*"]) as client:
        victim, call = await lose_a_call_midway(client, idempotent=False)
        assert await call == f"s{1 - servers.urls.index(victim)}"


async def test_failfast_raises_at_once(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, on_failure="failfast") as client:
        _, call = await lose_a_call_midway(client, idempotent=True)
        with pytest.raises(ConnectionLost):
            await call


async def test_failtry_retries_the_same_server(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, on_failure="failtry", retries=3) as client:
        victim, call = await lose_a_call_midway(client, idempotent=True)
        assert await call == f"s{servers.urls.index(victim)}"  # the same server, reconnected


async def test_backup_sends_a_hedged_call_and_takes_the_first_answer(servers):
    await servers.start(2)
    servers.workers[0].release.clear()  # s0 never answers until released
    async with polyrpc.connect(servers.list_url, on_failure="backup", backup_delay=0.05) as client:
        started = time.monotonic()
        names = [await client.call("Worker.held", timeout=2) for _ in range(4)]
        assert names == ["s1"] * 4
        assert time.monotonic() - started < 1.5
        # the calls hedged away from s0 were cancelled there: nothing left in flight
        await wait_until(lambda: all(m.in_flight == 0 for m in client.members.values()))
    servers.workers[0].release.set()


async def test_broadcast_and_fork(servers):
    await servers.start(3)
    async with polyrpc.connect(servers.list_url) as client:
        assert await client.broadcast("Worker.whoami") == {
            url: f"s{index}" for index, url in enumerate(servers.urls)
        }
        with pytest.raises(RemoteError):
            await client.broadcast("Worker.fail")
        servers.workers[0].release.clear()
        servers.workers[1].release.clear()
        assert await client.fork("Worker.held", timeout=2) == "s2"
        servers.workers[0].release.set()
        servers.workers[1].release.set()
        with pytest.raises(RemoteError):
            await client.fork("Worker.fail")


async def test_a_lost_server_is_marked_down_at_once_and_comes_back(servers):
    await servers.start(2)
    async with polyrpc.connect(servers.list_url, backoff=(0.02, 0.2)) as client:
        await servers.stop(0)
        await wait_until(lambda: len(client.live()) == 1, timeout=1)
        assert {await client.call("Worker.whoami") for _ in range(4)} == {"s1"}
        await servers.restart(0)
        await wait_until(lambda: len(client.live()) == 2, timeout=3)
        assert {await client.call("Worker.whoami") for _ in range(4)} == {"s0", "s1"}


async def test_calls_wait_for_a_server_up_to_their_timeout(servers):
    await servers.start(1)
    async with polyrpc.connect(servers.list_url, backoff=(0.02, 0.1)) as client:
        await servers.stop(0)
        await wait_until(lambda: not client.live())
        with pytest.raises(ConnectFailed):
            await client.call("Worker.whoami", timeout=0.2)
        call = asyncio.ensure_future(client.call("Worker.whoami", timeout=3))
        await asyncio.sleep(0.2)
        assert not call.done()
        await servers.restart(0)
        assert await call == "s0"


async def test_connect_with_reconnect_survives_a_server_restart(servers):
    await servers.start(1)
    async with polyrpc.connect(servers.urls[0], reconnect=True, backoff=(0.02, 0.1)) as client:
        assert await client.call("Worker.whoami") == "s0"
        await servers.stop(0)
        with pytest.raises((ConnectFailed, ConnectionLost)):
            await client.call("Worker.whoami", timeout=0.2)
        call = asyncio.ensure_future(client.call("Worker.whoami", timeout=3))
        await asyncio.sleep(0.1)
        await servers.restart(0)
        assert await call == "s0"


async def test_a_plain_connect_is_unchanged(servers):
    await servers.start(1)
    async with polyrpc.connect(servers.urls[0]) as client:
        assert isinstance(client, polyrpc.Client)


async def test_the_circuit_opens_after_failures_and_a_probe_closes_it(servers):
    await servers.start(2)
    async with polyrpc.connect(
        servers.list_url, breaker_threshold=2, breaker_reset=0.2, on_failure="failfast"
    ) as client:
        sick = client.members[servers.urls[0]]
        for _ in range(2):
            with pytest.raises(CallTimeout):
                await sick.call("Worker.slow", (1.0,), {}, 0.05, None)
        assert sick.breaker.state == "open" and not sick.live
        assert {await client.call("Worker.whoami") for _ in range(4)} == {"s1"}
        await wait_until(lambda: sick.live, timeout=2)  # the half-open ping succeeded


def test_backoff_doubles_up_to_its_cap_with_jitter():
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_circuit_breaker_states():
    breaker = CircuitBreaker(threshold=3, reset_after=0.05)
    assert not breaker.record_failure() and not breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.record_failure() and breaker.state == "open"
    time.sleep(0.06)
    assert breaker.state == "half_open"
    breaker.record_failure()  # the probe failed: open again, for longer
    assert breaker.state == "open" and breaker.wait > 0.05
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0
