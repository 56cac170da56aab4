"""Impaired paths for ``polyrpc bench --loss/--delay/--jitter/--rate``.

Two ways to put the same slow, lossy path between every row's client and server:

* ``netem`` (kernels with the netem qdisc, root): the client runs in a network
  namespace joined to this one by a veth pair, netem on both ends. Two plain relays
  keep the addresses the rows' certificates name (127.0.0.1) on both sides:
  client -> relay (namespace loopback) -> veth with netem -> relay -> server.
  Every packet crossing the veth, TCP segments included, sees the real loss.
* ``relay`` (anywhere): a user-space relay in its own process. UDP rows get
  :class:`~polyrpc.testing.udp_relay.UdpRelay` (loss, delay, jitter, rate). TCP and
  unix rows get :class:`StreamRelay`, which delays and rate-limits the byte stream
  but cannot drop packets: a relay only sees bytes, so TCP rows are not lossy.

Only loopback addresses and addresses inside the namespace created here are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*$")
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_loss(text: str) -> float:
    """``1%`` or ``0.01`` -> 0.01 (a probability per packet and direction)."""
    value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    if not 0 <= value < 1:
        raise ValueError(f"loss must be between 0% and 100% (exclusive), got {text!r}")
    return value


def parse_duration(text: str) -> float:
    """``20ms``, ``500us``, ``0.1s`` -> seconds (the unit is required)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 20ms, 500us or 0.1s, got {text!r}")
    return float(match[1]) * _TIME_UNITS[match[2]]


def parse_rate(text: str) -> float:
    """``100mbit``, ``1gbit``, ``512kbit`` -> bits per second."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"expected a rate like 100mbit, 1gbit or 512kbit, got {text!r}")
    return float(match[1]) * _RATE_UNITS[match[2].lower()]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:g} ms"


@dataclass(frozen=True)
class Impairment:
    """What the path does to each direction: loss probability, delay, jitter (s), rate (bit/s)."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0

    @property
    def active(self) -> bool:
        """True if the path differs from plain loopback."""
        return any((self.loss, self.delay, self.jitter, self.rate))

    def describe(self, lossless: bool = False) -> str:
        """Human-readable, e.g. ``loss 1%, delay 20 ms ± 5 ms, rate 100 Mbit/s``."""
        parts = []
        if self.loss and not lossless:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.delay or self.jitter:
            jitter = f" ± {_ms(self.jitter)}" if self.jitter else ""
            parts.append(f"delay {_ms(self.delay)}{jitter}")
        if self.rate:
            parts.append(f"rate {self.rate / 1e6:g} Mbit/s")
        return ", ".join(parts) + " each way" if parts else "no impairment"

    def as_dict(self) -> dict[str, float]:
        """For the JSON settings."""
        return asdict(self)

    def netem_args(self) -> list[str]:
        """The same impairment as ``tc qdisc ... netem`` arguments."""
        args = ["limit", "10000"]
        if self.delay or self.jitter:
            args += ["delay", f"{self.delay * 1e6:.0f}us", f"{self.jitter * 1e6:.0f}us"]
        if self.loss:
            args += ["loss", f"{self.loss * 100:g}%"]
        if self.rate:
            args += ["rate", f"{self.rate:.0f}bit"]
        return args


class StreamRelay:
    """Relays TCP (or unix) connections to ``target``, delaying and rate-limiting the bytes.

    Each direction is a queue of chunks with a due time: serialisation at ``rate``
    plus ``delay`` plus a uniform ±``jitter``, never earlier than the chunk before
    (a byte stream cannot reorder). Reading pauses while more than ``max_backlog``
    seconds of data wait for the link, so memory stays bounded. It cannot drop
    packets: the kernel's TCP below it never sees loss.
    """

    CHUNK = 64 << 10

    def __init__(
        self,
        target: tuple[str, int] | str,
        impairment: Impairment,
        *,
        host: str = "127.0.0.1",
        path: str | None = None,
        seed: int = 1,
        max_backlog: float = 0.25,
    ) -> None:
        self.target = target
        self.impairment = impairment
        self.host = host
        self.path = path
        self.max_backlog = max_backlog
        self.address: tuple[str, int] | str = path or (host, 0)
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StreamRelay:
        if self.path is not None:
            self._server = await asyncio.start_unix_server(self._accept, path=self.path)
        else:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
            self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(self.target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(reader, up_writer)),
            loop.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps)
        except (ConnectionError, asyncio.CancelledError):
            for pump in pumps:
                pump.cancel()
        finally:
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read, stamp each chunk with its due time, write it when due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        link_free = 0.0
        last_due = 0.0
        spec = self.impairment

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = loop.create_task(deliver())
        try:
            while data := await reader.read(self.CHUNK):
                now = loop.time()
                if spec.rate:
                    if (backlog := link_free - now) > self.max_backlog:
                        await asyncio.sleep(backlog - self.max_backlog)
                        now = loop.time()
                    link_free = max(now, link_free) + len(data) * 8 / spec.rate
                    now = link_free
                jitter = self._rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0
                last_due = max(last_due, now + max(0.0, spec.delay + jitter))
                queue.put_nowait((last_due, data))
            queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()


def netem_unavailable_reason() -> str | None:
    """None if netem can be used here (root, ip, tc, the sch_netem qdisc), else why not."""
    if os.geteuid() != 0:
        return "netem needs root (network namespaces, veth, tc)"
    probe = f"prpcprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot create a network namespace: {_stderr(exc)}"
    try:
        subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"this kernel has no netem qdisc ({_stderr(exc)})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _stderr(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or b"").decode(errors="replace").strip() or str(exc)
    return str(exc)


class NetemPath:
    """A network namespace for the client, joined by a veth pair with netem on both ends."""

    def __init__(self, impairment: Impairment) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"prpcb{tag}"
        self.host_if, self.ns_if = f"prpcb{tag}h", f"prpcb{tag}n"
        self.host_ip, self.ns_ip = "10.213.0.1", "10.213.0.2"
        self.impairment = impairment

    def _ip(self, *args: str, netns: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.namespace] if netns else []
        subprocess.run([*prefix, *args], check=True, capture_output=True)

    def __enter__(self) -> NetemPath:
        self._ip("ip", "netns", "add", self.namespace)
        try:
            # one segment per packet: netem drops and delays whole packets, and a 64 KiB TSO
            # or GSO burst would otherwise be lost (or kept) as one, ~45 segments at a time
            self._ip(
                *("ip", "link", "add", self.host_if, "gso_max_segs", "1", "type", "veth"),
                *("peer", "name", self.ns_if, "gso_max_segs", "1"),
            )
            self._ip("ip", "link", "set", self.ns_if, "netns", self.namespace)
            self._ip("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._ip("ip", "link", "set", self.host_if, "up")
            self._ip("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=True)
            self._ip("ip", "link", "set", self.ns_if, "up", netns=True)
            self._ip("ip", "link", "set", "lo", "up", netns=True)
            if self.impairment.active:  # without one it is a plain veth path (tests use it)
                netem = self.impairment.netem_args()
                self._ip("tc", "qdisc", "add", "dev", self.host_if, "root", "netem", *netem)
                self._ip(
                    "tc", "qdisc", "add", "dev", self.ns_if, "root", "netem", *netem, netns=True
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def counters(self) -> dict[str, int]:
        """netem's counters summed over both ends: packets and bytes sent, packets dropped."""
        total = {"packets": 0, "bytes": 0, "drops": 0}
        for iface, netns in ((self.host_if, False), (self.ns_if, True)):
            prefix = self.prefix if netns else []
            done = subprocess.run(
                [*prefix, "tc", "-s", "-j", "qdisc", "show", "dev", iface],
                check=True,
                capture_output=True,
                text=True,
            )
            for qdisc in json.loads(done.stdout):
                if qdisc.get("kind") == "netem":
                    for key in total:
                        total[key] += qdisc[key]
        return total

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a process inside the client's namespace."""
        return ["ip", "netns", "exec", self.namespace]


_LOOPBACK_ENDPOINT = re.compile(r"127\.0\.0\.1:(\d+)")
_UNIX_ENDPOINT = re.compile(r"^unix@([^?]+)")


def endpoint(info: str, network: str) -> str:
    """The server endpoint inside a row's connect info: ``127.0.0.1:PORT`` or a socket path."""
    pattern = _UNIX_ENDPOINT if network == "unix" else _LOOPBACK_ENDPOINT
    match = pattern.search(info)
    if not match:
        raise ValueError(f"no {network} endpoint in connect info {info!r}")
    return match[0] if network != "unix" else match[1]


def redirect(info: str, network: str, new_endpoint: str) -> str:
    """``info`` with its server endpoint replaced by ``new_endpoint`` (a relay's)."""
    old = endpoint(info, network)
    return info.replace(old, new_endpoint, 1)


async def run_relay(
    network: str, listen_host: str, target: str, impairment: Impairment, workdir: Path
) -> tuple[str, contextlib.AsyncExitStack]:
    """Start a relay to ``target``; return its endpoint and the stack that closes it."""
    from ..testing.udp_relay import UdpRelay

    stack = contextlib.AsyncExitStack()
    if network == "udp":
        host, port = target.rsplit(":", 1)
        udp = UdpRelay(
            (host, int(port)),
            loss=impairment.loss,
            delay=impairment.delay,
            jitter=impairment.jitter,
            rate=impairment.rate,
            host=listen_host,
        )
        await stack.enter_async_context(udp)
        return udp.url_hostport, stack
    if network == "unix":
        path = str(workdir / "relay.sock")
        await stack.enter_async_context(StreamRelay(target, impairment, path=path))
        return path, stack
    host, port = target.rsplit(":", 1)
    relay = StreamRelay((host, int(port)), impairment, host=listen_host)
    await stack.enter_async_context(relay)
    address: Any = relay.address
    return f"{address[0]}:{address[1]}", stack
