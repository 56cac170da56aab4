"""Service discovery: the :class:`Discovery` interface, :class:`Instance` and the backend
registry that maps a URL scheme (``list``, ``etcd``, third parties' entry points in group
``polyrpc.discovery``) to a backend, loaded lazily like the transports."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from ..errors import InvalidAddress, TransportUnavailable

ENTRY_POINT_GROUP = "polyrpc.discovery"

BUILTIN: dict[str, str] = {
    "list": "polyrpc.cluster.static:StaticDiscovery.from_url",
    "etcd": "polyrpc.cluster.etcd:EtcdDiscovery.from_url",
    "dns": "polyrpc.cluster.dns:DnsDiscovery.from_url",
}
"""Scheme -> ``module:callable`` taking the discovery URL and returning a :class:`Discovery`."""


@dataclass(frozen=True)
class Instance:
    """One server of a service: the URLs it serves (one per transport) under a stable id."""

    id: str
    urls: tuple[str, ...]
    weight: int = 1
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


class Discovery(ABC):
    """Where a service's live instances come from."""

    @abstractmethod
    def watch(self) -> AsyncGenerator[list[Instance], None]:
        """Yield the full list of live instances now, then again after every change (an
        async generator: it is closed when the client stops watching)."""

    async def register(self, instance: Instance, ttl: float) -> Registration:
        """Publish ``instance`` under this backend's service name with a lease of ``ttl``
        seconds, kept alive until the registration is closed (backends that can)."""
        raise NotImplementedError(f"{type(self).__name__} does not take registrations")

    async def close(self) -> None:  # noqa: B027 (most backends hold nothing to release)
        """Release what the backend holds (connections to the registry)."""


class Registration(ABC):
    """A live entry in a registry; closing it removes the entry at once."""

    @abstractmethod
    async def close(self) -> None:
        """Deregister (revoke the lease) and release the registry connection."""


class DiscoveryRegistry:
    """Maps discovery URL schemes to backend factories."""

    def __init__(self) -> None:
        self._targets: dict[str, str] = dict(BUILTIN)
        self._factories: dict[str, Callable[[str], Discovery]] = {}
        self._entry_points_read = False

    def register(self, scheme: str, factory: Callable[[str], Discovery]) -> None:
        """Register a backend: ``factory(url)`` returns its :class:`Discovery`."""
        self._factories[scheme] = factory

    def schemes(self) -> list[str]:
        """Every registered scheme."""
        if not self._entry_points_read:
            self._entry_points_read = True
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                self._targets.setdefault(ep.name, ep.value)
        return sorted({*self._targets, *self._factories})

    def handles(self, url: str) -> bool:
        """Whether ``url`` names a discovery backend rather than one server's transport."""
        return isinstance(url, str) and "://" in url and scheme_of(url) in self.schemes()

    def _factory(self, scheme: str) -> Callable[[str], Discovery]:
        if scheme in self._factories:
            return self._factories[scheme]
        if scheme not in self.schemes():
            raise InvalidAddress(
                f"unknown discovery scheme {scheme!r}; registered: {', '.join(self.schemes())}"
            )
        module_name, _, attr = self._targets[scheme].partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # a backend whose client library is missing is reported
            raise TransportUnavailable(
                f"{scheme}: could not load discovery backend {self._targets[scheme]} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self._factories[scheme] = obj
        return obj

    def open(self, url: str) -> Discovery:
        """The backend for ``url`` (e.g. ``list://tcp@h1:1,tcp@h2:2``)."""
        return self._factory(scheme_of(url))(url)


def scheme_of(url: str) -> str:
    """The scheme of a discovery URL, lower-cased."""
    return url.split("://", 1)[0].lower()


discovery_registry = DiscoveryRegistry()
"""The process-wide registry used by :func:`polyrpc.connect`."""
