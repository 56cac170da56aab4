"""Services at scale: clients of a whole service found by discovery (``list://``, ``etcd://``,
plugins), with transport preference, selectors, fail modes, health and reconnection."""

from __future__ import annotations

from typing import Any

from ..rpc.endpoints import _Opening
from .client import ClusterClient, ClusterProxy, ClusterStream, Member
from .discovery import Discovery, DiscoveryRegistry, Instance, Registration, discovery_registry
from .preference import DEFAULT_PREFERENCE, choose_url
from .selectors import Selector
from .server import RegisteredServer, serve
from .static import StaticDiscovery


def connect(url: str, *, reconnect: bool = False, **options: Any) -> _Opening:
    """A :class:`ClusterClient` for a discovery URL (``list://...``, ``etcd://host:port/name``),
    or, with ``reconnect=True``, for one server's URL: it reconnects with backoff and its
    calls wait for the connection up to their timeout (failfast: one server, no retry)."""
    if discovery_registry.handles(url):
        discovery = discovery_registry.open(url)
    elif reconnect:
        discovery = StaticDiscovery.of_urls([url])
        options.setdefault("on_failure", "failfast")
    else:
        raise ValueError(f"{url!r} names no discovery backend ({discovery_registry.schemes()})")
    return _Opening(lambda: ClusterClient(discovery, **options).start())


def is_cluster_url(url: str, reconnect: bool = False) -> bool:
    """Whether :func:`polyrpc.connect` hands ``url`` to :func:`connect` of this package."""
    return reconnect or discovery_registry.handles(url)


__all__ = [
    "DEFAULT_PREFERENCE",
    "ClusterClient",
    "ClusterProxy",
    "ClusterStream",
    "Discovery",
    "DiscoveryRegistry",
    "Instance",
    "Member",
    "RegisteredServer",
    "Registration",
    "Selector",
    "StaticDiscovery",
    "choose_url",
    "connect",
    "discovery_registry",
    "is_cluster_url",
    "serve",
]
