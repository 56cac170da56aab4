"""The server under attack (a real ``polyrpc serve`` subprocess) and raw peers that speak
bytes to it, for the hostile-peer suite."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import polyrpc
from bench import budgets
from polyrpc.wire.frames import FrameDecoder, Kind
from tests.test_conformance import error_frames

MiB = 1 << 20
STREAMS = ["tcp", "unix", "tls"]
"""The byte-stream transports a raw peer speaks to directly."""
SCHEMES = [*STREAMS, "kcp", "quic"]
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
"""Under scripts/sanitize.sh ASan's shadow memory and quarantine inflate RSS: freed blocks
wait in its quarantine (256 MiB by default) instead of being reused, so churn shows as
growth (300 peers reset mid-frame: +75 MiB there, +0.0 MiB without ASan)."""
RSS_SLACK = 8 if SANITIZED else 1


class Target:
    """The server under attack: its process, URLs by scheme, and what it costs."""

    def __init__(self, pid: int, urls: dict[str, str], decoder: str) -> None:
        self.pid = pid
        self.urls = urls
        self.decoder = decoder
        self.baseline_fds = 0

    def rss(self) -> int:
        """The server's resident set size now (bytes)."""
        return budgets.rss(self.pid)

    def start_peak(self) -> int:
        """Reset the peak RSS (VmHWM) to the current RSS, and return that."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear:
            clear.write("5")
        return self.rss()

    def growth(self, since: int, what: str) -> int:
        """How far the peak RSS rose above ``since`` (printed for docs/benchmarks.md)."""
        with open(f"/proc/{self.pid}/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        print(f"\n{self.decoder} decoder, {what}: peak server RSS +{(peak - since) / MiB:.1f} MiB")
        return peak - since

    def fds(self) -> int:
        """How many descriptors the server holds open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def address(self, scheme: str) -> tuple[str, int] | str:
        """Where a raw socket connects (host, port), or the unix socket's path."""
        rest = self.urls[scheme].split("@", 1)[1].split("?", 1)[0]
        if scheme == "unix":
            return rest
        host, port = rest.rsplit(":", 1)
        return host, int(port)

    async def serves(self, scheme: str = "tcp") -> float:
        """Connect a normal client and call; the seconds it took (asserted < 5 s: served,
        not starved, on a loaded 2-core CI machine)."""
        started = time.perf_counter()
        async with polyrpc.connect(self.urls[scheme], handshake_timeout=5) as client:
            assert await client.call("Demo.add", 2, 3, timeout=5) == 5
        elapsed = time.perf_counter() - started
        assert elapsed < 5.0, f"{scheme} call took {elapsed:.2f}s"
        return elapsed

    async def settled(self, timeout: float = 15.0) -> None:
        """Wait for the descriptors to return to their baseline (the bad peers are gone)."""
        deadline = time.monotonic() + timeout
        while self.fds() > self.baseline_fds:
            assert time.monotonic() < deadline, (
                f"{self.fds()} descriptors open, {self.baseline_fds} before the case"
            )
            await asyncio.sleep(0.1)


class _KeptReader(asyncio.StreamReader):
    """A stream reader that keeps what arrived before a reset (it reads as the end):
    asyncio's own raises the reset first, and the server's last ERROR frame was lost."""

    def set_exception(self, exc: BaseException) -> None:
        self.feed_eof()


def _tls_context() -> ssl.SSLContext:
    """A client context that accepts the test certificate (no CA store: that takes 150 ms)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_TLS = _tls_context()


class Raw:
    """A raw byte-stream peer (tcp, unix or tls) that writes what it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: Target, scheme: str, handshake: bool = False) -> Raw:
        loop = asyncio.get_running_loop()
        reader = _KeptReader()
        address = target.address(scheme)
        protocol = asyncio.StreamReaderProtocol(reader)
        if isinstance(address, str):
            transport, _ = await loop.create_unix_connection(lambda: protocol, address)
        else:
            tls = _TLS if scheme == "tls" else None
            transport, _ = await loop.create_connection(lambda: protocol, *address, ssl=tls)
        raw = cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
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
