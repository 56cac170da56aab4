"""The ``dns://name:port`` discovery backend: every address a name resolves to (A and AAAA
records, through the system resolver) is one server, resolved again every ``interval``."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator
from urllib.parse import parse_qs, urlsplit

from ..errors import InvalidAddress
from .discovery import Discovery, Instance

log = logging.getLogger("polyrpc.cluster")


class DnsDiscovery(Discovery):
    """``dns://name:port?transport=tcp&interval=10``: the servers are ``transport@address:port``
    for each address of ``name``; a failed lookup keeps the last list."""

    def __init__(self, host: str, port: int, transport: str = "tcp", interval: float = 10.0):
        self.host = host
        self.port = port
        self.transport = transport
        self.interval = interval

    @classmethod
    def from_url(cls, url: str) -> DnsDiscovery:
        """Parse ``dns://name:port[?transport=tcp][&interval=10]``."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if not parts.hostname or not parts.port:
            raise InvalidAddress(f"{url!r}: expected dns://name:port")
        transport = query.get("transport", ["tcp"])[0]
        return cls(parts.hostname, parts.port, transport, float(query.get("interval", [10])[0]))

    def _url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.transport}@{host}:{self.port}"

    async def watch(self) -> AsyncGenerator[list[Instance], None]:
        """Resolve now, then every ``interval``; yield when the addresses change."""
        loop = asyncio.get_running_loop()
        last: list[Instance] | None = None
        while True:
            try:
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("dns %s: %s; keeping the last list", self.host, exc)
            else:
                urls = sorted({self._url(str(info[4][0])) for info in infos})
                instances = [Instance(id=url, urls=(url,)) for url in urls]
                if instances != last:
                    last = instances
                    yield instances
            if last is None:
                yield []  # the first answer is due at once, even an empty one
                last = []
            await asyncio.sleep(self.interval)
