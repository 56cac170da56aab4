"""The server under attack (a real ``polyrpc serve`` subprocess) and raw peers that speak
bytes to it, for the hostile-peer suite."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import polyrpc
from bench import budgets
from polyrpc.core.frames import FrameDecoder, Kind
from tests.test_rpc_conformance import error_frames

MiB = 1 << 20
STREAMS = ["tcp", "unix", "tls"]
"""The byte-stream transports a raw peer speaks to directly."""
SCHEMES = [*STREAMS, "kcp", "quic"]
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
"""Under scripts/sanitize.sh ASan's shadow memory and quarantine inflate RSS."""
RSS_SLACK = 4 if SANITIZED else 1


class Target:
    """The server under attack: its process, URLs by scheme, and what it costs."""

    def __init__(self, pid: int, urls: dict[str, str], decoder: str) -> None:
        self.pid = pid
        self.urls = urls
        self.decoder = decoder
        self.baseline_fds = 0

    def rss(self) -> int:
        return budgets.rss(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def address(self, scheme: str) -> tuple[str, int] | str:
        """Where a raw socket connects (host, port), or the unix socket's path."""
        rest = self.urls[scheme].split("@", 1)[1].split("?", 1)[0]
        if scheme == "unix":
            return rest
        host, port = rest.rsplit(":", 1)
        return host, int(port)

    async def serves(self, scheme: str = "tcp") -> float:
        """Connect a normal client and call; the seconds it took (asserted < 2 s)."""
        started = time.perf_counter()
        async with polyrpc.connect(self.urls[scheme], handshake_timeout=5) as client:
            assert await client.call("Demo.add", 2, 3, timeout=5) == 5
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0, f"{scheme} call took {elapsed:.2f}s"
        return elapsed

    async def settled(self, timeout: float = 15.0) -> None:
        """Wait for the descriptors to return to their baseline (the bad peers are gone)."""
        deadline = time.monotonic() + timeout
        while self.fds() > self.baseline_fds:
            assert time.monotonic() < deadline, (
                f"{self.fds()} descriptors open, {self.baseline_fds} before the case"
            )
            await asyncio.sleep(0.1)


class Raw:
    """A raw byte-stream peer (tcp, unix or tls) that writes what it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: Target, scheme: str, handshake: bool = False) -> Raw:
        address = target.address(scheme)
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            tls = None
            if scheme == "tls":
                tls = ssl.create_default_context()
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
            reader, writer = await asyncio.open_connection(*address, ssl=tls)
        raw = cls(reader, writer)
        if handshake:
            await raw.send(budgets.hello())
            reply = await asyncio.wait_for(reader.read(4096), 5)
            assert [f.kind for f in FrameDecoder().feed(reply)] == [Kind.HELLO], reply
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the server sends until it closes the connection."""
        data = b""
        async with asyncio.timeout(timeout):
            try:
                while chunk := await self.reader.read(65536):
                    data += chunk
            except (ConnectionError, ssl.SSLError):
                pass
        return data

    def close(self) -> None:
        self.writer.transport.abort()


def error_codes(data: bytes) -> list[str]:
    """The codes of the ERROR frames a raw peer received."""
    return [body["code"] for body in error_frames(data)]
