"""The ``list://`` discovery backend: a fixed list of servers written in the URL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable

from ..errors import InvalidAddress
from .discovery import Discovery, Instance


class StaticDiscovery(Discovery):
    """Servers that never change: ``list://tcp@h1:1,kcp@h2:2``.

    Commas separate servers; ``|`` separates the URLs of one server offering several
    transports (``list://tcp@h1:1|unix@/run/a.sock,tcp@h2:2``). Each server's id is its
    first URL.
    """

    def __init__(self, instances: Iterable[Instance]) -> None:
        self.instances = list(instances)

    @classmethod
    def from_url(cls, url: str) -> StaticDiscovery:
        """Parse a ``list://`` URL."""
        _, _, body = url.partition("://")
        instances = []
        for server in body.split(","):
            urls = tuple(part.strip() for part in server.split("|") if part.strip())
            if urls:
                instances.append(Instance(id=urls[0], urls=urls))
        if not instances:
            raise InvalidAddress(f"{url!r} lists no server; expected e.g. list://tcp@h1:1,tcp@h2:2")
        return cls(instances)

    @classmethod
    def of_urls(cls, urls: Iterable[str]) -> StaticDiscovery:
        """One server per URL."""
        return cls(Instance(id=url, urls=(url,)) for url in urls)

    async def watch(self) -> AsyncGenerator[list[Instance], None]:
        """The list once; then nothing changes (the iterator stays open)."""
        yield list(self.instances)
        await asyncio.Event().wait()
