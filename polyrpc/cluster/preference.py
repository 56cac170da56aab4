"""Which of a server's URLs to use: the first usable one in a preference order of schemes."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from ..errors import PolyrpcError
from ..stream.address import split_scheme
from ..stream.registry import registry

DEFAULT_PREFERENCE: tuple[str, ...] = ("rdma", "mem", "unix", "kcp", "tcp", "tls", "quic")
"""Fastest first: rdma where the verbs stack works, then the local-only transports (mem in
this process, unix on this host), then kcp and tcp, tls and quic last (encryption costs)."""

LOCAL_ONLY = frozenset({"mem", "unix"})
"""Schemes that reach only a server on this host (``mem``: in this process)."""


def _is_local_host(host: str) -> bool:
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in {"localhost", socket.gethostname(), socket.getfqdn()}


def _host_of(url: str) -> str | None:
    """The host part of a host:port URL, None for path-like addresses (unix, mem)."""
    _, rest = split_scheme(url)
    rest = rest.split("?", 1)[0].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if ":" in rest else None


def on_this_host(urls: Sequence[str]) -> bool:
    """Whether a server offering ``urls`` runs here: every host it names is local (a server
    naming no host at all, only unix/mem addresses, is taken to be local)."""
    hosts = [host for url in urls if (host := _host_of(url))]
    return all(_is_local_host(host) for host in hosts)


def usable(scheme: str) -> bool:
    """Whether this process can dial ``scheme`` (its transport loads and is available)."""
    try:
        return registry.get(scheme).unavailable_reason() is None
    except PolyrpcError:
        return False


def choose_url(urls: Sequence[str], preference: Sequence[str] = DEFAULT_PREFERENCE) -> str | None:
    """The URL to dial among a server's ``urls``: by ``preference`` order, skipping schemes
    unusable here and local-only ones for a server on another host; schemes not in the list
    come after it, in the server's order. None if none is usable."""
    local = on_this_host(urls)
    rank = {scheme: index for index, scheme in enumerate(preference)}
    candidates = []
    for position, url in enumerate(urls):
        scheme = split_scheme(url)[0]
        if (scheme in LOCAL_ONLY and not local) or not usable(scheme):
            continue
        candidates.append((rank.get(scheme, len(rank)), position, url))
    return min(candidates)[2] if candidates else None
