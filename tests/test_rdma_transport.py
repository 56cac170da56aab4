"""rdma-specific behaviour with real verbs: credits, resource release, peer death, errors.

These need an RDMA device, which this project's hosts do not have: run them in the
soft-RoCE VM with ``vm/rdma-vm.sh test``. Outside the VM they skip, except under
CI=true, where a skip would hide that the VM runner did not run them: they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import polyrpc
from polyrpc import registry
from polyrpc.errors import ConnectFailed, InvalidAddress, TransportUnavailable

IN_VM = os.environ.get("POLYRPC_IN_RDMA_VM") == "1"
HOW = "RDMA tests need real verbs: run them in the soft-RoCE VM with `vm/rdma-vm.sh test`"


@pytest.fixture(autouse=True)
def _require_vm() -> None:
    if IN_VM:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{HOW} (CI=true: the VM runner must run these; skipping is not allowed)")
    pytest.skip(HOW)


class Recorder:
    """Records what a stream delivers."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.exc: Exception | None = None

    def data_received(self, data) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof.set()

    def connection_lost(self, exc) -> None:
        self.exc = exc
        self.lost.set()


def urls() -> tuple[str, dict[str, str]]:
    return registry.get("rdma").loopback_urls(None)  # type: ignore[arg-type]


def client_url(bound: str, extra: str = "") -> str:
    _listen, options = urls()
    transport = registry.get("rdma")
    address = transport.parse(bound).with_options(**options)
    return str(address) + (("&" if "?" in str(address) else "?") + extra if extra else "")


async def open_pair(listen_options: str = "", dial_options: str = ""):
    """A listener plus one connected (client, server) stream pair with recorders, both
    with their full buffers (as the session gives them once its handshake is done)."""
    transport = registry.get("rdma")
    accepted: asyncio.Queue = asyncio.Queue()

    def on_stream(stream) -> None:
        rec = Recorder()
        stream.set_receiver(rec)
        accepted.put_nowait((stream, rec))

    listen, _ = urls()
    if listen_options:
        listen += ("&" if "?" in listen else "?") + listen_options
    listener = await transport.listen(transport.parse(listen), on_stream)
    client = await transport.dial(transport.parse(client_url(listener.url, dial_options)))
    mine = Recorder()
    client.set_receiver(mine)
    server, theirs = await asyncio.wait_for(accepted.get(), 10)
    client.handshake_done()
    server.handshake_done()
    return listener, client, mine, server, theirs


def pattern(size: int) -> bytes:
    block = bytes((i * 131 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def verbs_resources() -> dict[str, int]:
    """Per-type totals of `rdma res show` (pd, cq, qp, cm_id, mr, ctx) over all devices."""
    out = subprocess.run(["rdma", "res", "show"], capture_output=True, text=True).stdout
    totals: dict[str, int] = {}
    for name, count in re.findall(r"(\w+) (\d+)", out):
        totals[name] = totals.get(name, 0) + int(count)
    return totals


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_credits_stop_the_sender_without_rnr():
    """A paused reader stops the sender after depth messages; no receiver-not-ready error."""
    listener, client, mine, server, theirs = await open_pair("depth=8&bufsize=4096")
    try:
        server.pause_reading()
        payload = pattern(client.high_water + (1 << 20))
        client.write([payload])
        await asyncio.sleep(1.0)
        # at most depth messages of bufsize (plus the 4 handshake buffers of 4 KiB the peer
        # posted first) can be in the peer's buffers; the rest waits here
        assert client.write_buffer_size >= len(payload) - (8 + 4) * 4096
        assert client.writing_paused
        assert not mine.lost.is_set() and not theirs.lost.is_set()
        server.resume_reading()
        await asyncio.wait_for(client.drain(), 60)
        await wait_for_data(theirs, payload, 30)
    finally:
        client.abort()
        server.abort()
        await listener.close()


async def test_writes_spanning_slot_runs_arrive_intact_with_a_pausing_reader():
    """Writes of any size (filling runs of consecutive send slots with one copy, wrapping at
    the buffer's end) arrive in order, also when the reader pauses in the middle of a batch
    of received messages (the rest of the batch waits and follows after resume)."""
    listener, client, _mine, server, theirs = await open_pair(
        "depth=8&bufsize=4096", "depth=8&bufsize=4096"
    )
    try:
        rng = random.Random(7)
        sizes = [rng.choice((1, 100, 4095, 4096, 4097, 9000, 30000, 70000)) for _ in range(150)]
        data = pattern(sum(sizes))
        loop = asyncio.get_running_loop()
        record = theirs.data_received
        deliveries = 0

        def pausing_reader(chunk) -> None:
            nonlocal deliveries
            record(chunk)
            deliveries += 1
            if deliveries % 3 == 0:
                server.pause_reading()
                loop.call_later(0.002, server.resume_reading)

        theirs.data_received = pausing_reader  # type: ignore[method-assign]
        pos = 0
        for size in sizes:
            client.write([data[pos : pos + size]])
            pos += size
            if rng.random() < 0.2:
                await client.drain()
        await asyncio.wait_for(client.drain(), 60)
        await wait_for_data(theirs, data, 30)
    finally:
        await client.close()
        await server.close()
        await listener.close()


async def test_bufsize_and_depth_are_negotiated_per_side():
    listener, client, mine, server, theirs = await open_pair(
        "bufsize=4096&depth=4", "bufsize=65536&depth=16"
    )
    try:
        assert client.get_extra_info("bufsize") == 4096
        assert server.get_extra_info("bufsize") == 4096
        data = pattern(100_000)
        await client.send([data])
        await server.send([data[::-1]])
        for _ in range(400):
            if len(theirs.data) == len(data) and len(mine.data) == len(data):
                break
            await asyncio.sleep(0.05)
        assert bytes(theirs.data) == data
        assert bytes(mine.data) == data[::-1]
        assert client.get_extra_info("transport") == "rdma"
        assert client.get_extra_info("device", "").startswith("rxe")
    finally:
        await client.close()
        await server.close()
        await listener.close()


async def test_graceful_close_delivers_everything_then_eof():
    listener, client, _mine, server, theirs = await open_pair()
    try:
        data = pattern(300_000)
        client.write([data])
        await client.close()
        await asyncio.wait_for(theirs.eof.wait(), 10)
        assert bytes(theirs.data) == data
        await asyncio.wait_for(theirs.lost.wait(), 10)
        with pytest.raises(polyrpc.ConnectionLost):
            server.write([b"late"])
    finally:
        await listener.close()


async def test_abort_gives_peer_connection_lost():
    listener, client, _mine, _server, theirs = await open_pair()
    try:
        client.abort()
        await asyncio.wait_for(theirs.lost.wait(), 5)
        assert isinstance(theirs.exc, polyrpc.ConnectionLost)
        assert not theirs.eof.is_set()
    finally:
        await listener.close()


async def test_two_hundred_connect_close_cycles_release_everything():
    transport = registry.get("rdma")
    listen, _ = urls()
    streams: list = []
    listener = await transport.listen(transport.parse(listen), streams.append)
    url = transport.parse(client_url(listener.url))

    async def cycle() -> None:
        client = await transport.dial(url)
        client.set_receiver(Recorder())
        await client.send([b"x" * 100])
        await client.close()
        while streams:
            server = streams.pop()
            server.set_receiver(Recorder())
            await server.close()

    try:
        for _ in range(5):  # warm-up: lazily loaded libraries, caches
            await cycle()
        fds, verbs = open_fds(), verbs_resources()
        for _ in range(200):
            await cycle()
        await asyncio.sleep(0.2)
        assert open_fds() == fds
        assert verbs_resources() == verbs
    finally:
        await listener.close()
    await asyncio.sleep(0.2)
    assert verbs_resources().get("cm_id", 0) <= verbs.get("cm_id", 0)


PEER = textwrap.dedent(
    """
    import asyncio, sys
    from polyrpc import registry

    async def main(url):
        t = registry.get("rdma")
        def on_stream(stream):
            class Sink:
                def data_received(self, data):
                    pass
                def eof_received(self):
                    pass
                def connection_lost(self, exc):
                    pass
            stream.set_receiver(Sink())
            async def flood():
                chunk = bytes(65536)
                while True:
                    await stream.send([chunk])
            asyncio.ensure_future(flood())
        listener = await t.listen(t.parse(url), on_stream)
        print(listener.url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_peer_killed_mid_transfer_gives_connection_lost_promptly():
    listen, _ = urls()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER, listen], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        transport = registry.get("rdma")
        client = await transport.dial(transport.parse(client_url(line.strip())))
        rec = Recorder()
        client.set_receiver(rec)
        for _ in range(400):
            if len(rec.data) > 1 << 20:
                break
            await asyncio.sleep(0.05)
        assert len(rec.data) > 1 << 20, "the peer's bulk transfer never started"
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(rec.lost.wait(), 10)
        elapsed = time.monotonic() - started
        assert isinstance(rec.exc, polyrpc.ConnectionLost)
        assert "without closing" in str(rec.exc)
        assert elapsed < 2.5, f"took {elapsed:.2f}s to notice the dead peer"
        with pytest.raises(polyrpc.ConnectionLost):
            await client.send([b"x"])
    finally:
        proc.kill()
        proc.wait()


FIRST_CONTACT_PEER = textwrap.dedent(
    """
    import asyncio, sys, time
    from polyrpc import registry
    from polyrpc.transports.rdma import stream as rdma_stream

    url, stall, greet = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "greet"
    original = rdma_stream.RdmaStream.__init__

    def late_init(self, *args, **kwargs):
        time.sleep(stall)  # descheduled between accepting and arming the CQ
        original(self, *args, **kwargs)

    rdma_stream.RdmaStream.__init__ = late_init

    async def main():
        t = registry.get("rdma")
        def on_stream(stream):
            class Echo:
                def data_received(self, data):
                    stream.write([bytes(data)])
                def eof_received(self):
                    pass
                def connection_lost(self, exc):
                    pass
            stream.set_receiver(Echo())
            if greet:
                stream.write([b"greeting"])
        listener = await t.listen(t.parse(url), on_stream)
        print(listener.url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def start_first_contact_peer(stall: float, greet: bool) -> tuple[subprocess.Popen, str]:
    """A fresh listener process (echo, optionally greeting first); returns it and its URL."""
    listen, _ = urls()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", FIRST_CONTACT_PEER, listen, str(stall)]
    proc = subprocess.Popen(
        [*args, "greet" if greet else "echo"], stdout=subprocess.PIPE, env=env, text=True
    )
    return proc, proc.stdout.readline().strip()


async def wait_for_data(rec: Recorder, want: bytes, seconds: float = 10.0) -> None:
    """Wait until ``rec`` holds exactly ``want``; fail with what it got otherwise."""
    for _ in range(int(seconds / 0.02)):
        if bytes(rec.data) == want:
            return
        await asyncio.sleep(0.02)
    assert bytes(rec.data) == want


@pytest.mark.parametrize("stall", [0.0, 0.3], ids=["prompt", "descheduled"])
async def test_first_message_to_a_fresh_listener_process_is_never_lost(stall):
    """The first message of a fresh process's first connection arrives (it used to sit
    unsignalled in the CQ when it beat the listener's arming of the CQ)."""
    transport = registry.get("rdma")
    for i in range(4):
        proc, url = await asyncio.to_thread(start_first_contact_peer, stall, False)
        try:
            client = await transport.dial(transport.parse(client_url(url)))
            rec = Recorder()
            client.set_receiver(rec)
            await client.send([b"hello %d" % i])
            await wait_for_data(rec, b"hello %d" % i)
            await client.close()
        finally:
            proc.kill()
            proc.wait()


async def test_message_that_beats_the_dialers_stream_is_delivered(monkeypatch):
    """A listener that speaks first can fill the dialer's CQ before the dialer's stream exists."""
    from polyrpc.transports.rdma import stream as rdma_stream

    original = rdma_stream.RdmaStream.__init__

    def late_init(self, *args, **kwargs) -> None:
        time.sleep(0.3)  # descheduled between connecting and arming the CQ
        original(self, *args, **kwargs)

    monkeypatch.setattr(rdma_stream.RdmaStream, "__init__", late_init)
    proc, url = await asyncio.to_thread(start_first_contact_peer, 0.0, True)
    try:
        transport = registry.get("rdma")
        client = await transport.dial(transport.parse(client_url(url)))
        rec = Recorder()
        client.set_receiver(rec)
        await wait_for_data(rec, b"greeting")
        await client.send([b"and back"])
        await wait_for_data(rec, b"greetingand back")
        await client.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("spin", [0, 2000])
async def test_answers_slower_than_the_spin_still_wake_the_reader(spin):
    """After a spin that found nothing the CQ is armed again, so a late answer is delivered."""
    listener, client, mine, server, theirs = await open_pair(f"spin={spin}", f"spin={spin}")
    try:
        expected = b""
        for i in range(6):
            client.write([b"ping %d;" % i])
            await wait_for_data(theirs, b"".join(b"ping %d;" % n for n in range(i + 1)))
            await asyncio.sleep(0.05 * (i % 3))  # answer within, around and after the spin
            server.write([b"pong %d;" % i])
            expected += b"pong %d;" % i
            await wait_for_data(mine, expected)
    finally:
        await client.close()
        await server.close()
        await listener.close()


async def test_idle_connection_does_not_spin():
    listener, client, _mine, server, theirs = await open_pair()
    try:
        await client.send([b"warm"])
        await asyncio.sleep(0.2)
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.3, f"{cpu:.2f}s of CPU in one idle second: something polls"
        await client.send([b"still awake"])
        for _ in range(100):
            if bytes(theirs.data) == b"warmstill awake":
                break
            await asyncio.sleep(0.02)
        assert bytes(theirs.data) == b"warmstill awake"
    finally:
        await client.close()
        await server.close()
        await listener.close()


async def test_dial_nobody_listening_is_refused():
    transport = registry.get("rdma")
    listen, _ = urls()
    host = transport.parse(listen).host
    with pytest.raises(ConnectFailed, match="refused"):
        await transport.dial(transport.parse(client_url(f"rdma@{host}:1")))


async def test_listen_on_non_rdma_address_is_unavailable():
    transport = registry.get("rdma")
    with pytest.raises(TransportUnavailable, match="not the address of an RDMA interface"):
        await transport.listen(transport.parse("rdma@127.0.0.1:0"), lambda s: None)


async def test_wrong_device_and_bad_options_are_rejected():
    transport = registry.get("rdma")
    listen, _ = urls()
    host = transport.parse(listen).host
    with pytest.raises(InvalidAddress, match="not nosuch0"):
        await transport.listen(transport.parse(f"rdma@{host}:0?dev=nosuch0"), lambda s: None)
    with pytest.raises(InvalidAddress, match="power of two"):
        transport.parse(f"rdma@{host}:1?bufsize=5000")
    with pytest.raises(InvalidAddress, match="valid options"):
        transport.parse(f"rdma@{host}:1?mtu=9000")


class Echo:
    """Answers with what it got."""

    async def back(self, data):
        """The argument, unchanged."""
        return data


async def test_handshaking_connections_register_32_kib_until_authenticated():
    """Issue #14: before the polyrpc handshake an rdma connection registers only its
    handshake rings (32 KiB, not 2 x depth x bufsize = 4 MiB), however long the peer stays
    silent; once the HELLO is exchanged both sides register their full rings, and large
    payloads flow."""
    listen, _ = urls()
    transport = registry.get("rdma")
    handshake_rings = 2 * 4 * 4096
    full = handshake_rings + 2 * 32 * 65536
    async with polyrpc.serve(listen, Echo(), handshake_timeout=30.0) as server:
        url = client_url(server.urls[0])
        silent = []
        for _ in range(3):  # peers that connect and never send HELLO
            raw = await transport.dial(transport.parse(url))
            raw.set_receiver(Recorder())
            silent.append(raw)
        for _ in range(500):
            if len(server.handshaking) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(server.handshaking) == 3
        assert [c.byte_stream.registered_bytes for c in server.handshaking] == [handshake_rings] * 3
        async with polyrpc.connect(url) as client:
            data = pattern(300_000)
            assert await client.call("Echo.back", data) == data
            (conn,) = server.connections
            assert conn.byte_stream.registered_bytes == full
            assert client.byte_stream.registered_bytes == full
        assert [c.byte_stream.registered_bytes for c in server.handshaking] == [handshake_rings] * 3
        for raw in silent:
            raw.abort()


LOCKED_MEMORY_PEER = textwrap.dedent(
    """
    import asyncio, resource, sys
    import polyrpc

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
    role, url = sys.argv[1:3]

    class Echo:
        async def back(self, data):
            return data

    async def main():
        if role == "dial":
            try:
                async with polyrpc.connect(url) as client:
                    await client.call("Echo.back", 1)
            except polyrpc.ConnectionLost as exc:
                print("lost:", exc, flush=True)
            else:
                print("served", flush=True)
            return
        async with polyrpc.serve(url, Echo()) as server:
            print(server.urls[0], flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


def locked_memory_peer(role: str, url: str) -> subprocess.Popen:
    """A process that may lock 1 MiB and lacks CAP_IPC_LOCK (as an ordinary user would)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    drop = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    return subprocess.Popen(
        [*drop, sys.executable, "-c", LOCKED_MEMORY_PEER, role, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


async def test_the_locked_memory_limit_is_named_on_both_sides():
    """Registered buffers are locked memory: a process whose RLIMIT_MEMLOCK is below an
    authenticated connection's 2 x depth x bufsize connects (the handshake rings fit), then
    loses the connection with a ConnectionLost naming the limit when it registers its full
    rings; a listener in that situation logs the same and the dialer's call fails."""
    listen, _ = urls()
    async with polyrpc.serve(listen, Echo()) as server:
        dialer = locked_memory_peer("dial", client_url(server.urls[0]))
        out, _ = await asyncio.to_thread(dialer.communicate, None, 60)
        assert out.startswith("lost: rdma: locked-memory limit (1048576 bytes"), out
        assert "4194304 bytes of buffers" in out and "ulimit -l unlimited" in out, out

    listener = locked_memory_peer("listen", listen)
    try:
        url = await asyncio.to_thread(listener.stdout.readline)
        with pytest.raises(polyrpc.ConnectionLost):
            async with polyrpc.connect(client_url(url.strip())) as client:
                await client.call("Echo.back", 1, timeout=30)
    finally:
        _, err = await asyncio.to_thread(listener.communicate, "", 30)  # (closes its stdin)
    assert "locked-memory limit (1048576 bytes" in err, err


def test_bench_rows_run_over_rdma_one_way_and_echo(tmp_path):
    """`polyrpc bench` drives rdma as a user would; the stream worker checks the server's count."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "polyrpc.cli", "bench", "--transports", "rdma,rdma/rpc"]
    command += ["--workloads", "bulk,stream", "--seconds", "0.5", "--repeat", "1"]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = {(r["transport"], r["workload"]): r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {(t, w) for t in ("rdma", "rdma/rpc") for w in ("bulk", "stream")}
    for key, result in results.items():
        assert result["mb_per_s"] > 0, (key, result)
    assert "p50_us" not in results[("rdma", "stream")]
