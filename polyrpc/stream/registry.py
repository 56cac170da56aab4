"""The transport registry: built-ins plus entry points in group ``polyrpc.transports``.

Transports load lazily so that one whose dependencies are missing is still listed,
with the reason, instead of breaking ``import polyrpc``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..errors import InvalidAddress, TransportUnavailable
from .address import split_scheme
from .transport import Transport

ENTRY_POINT_GROUP = "polyrpc.transports"

BUILTIN: dict[str, str] = {
    "tcp": "polyrpc.transports.tcp:TcpTransport",
    "tls": "polyrpc.transports.tcp:TlsTransport",
    "unix": "polyrpc.transports.tcp:UnixTransport",
    "mem": "polyrpc.transports.mem:MemoryTransport",
    "quic": "polyrpc.transports.quic:QuicTransport",
    "kcp": "polyrpc.transports.kcp:KcpTransport",
    "rdma": "polyrpc.transports.rdma:RdmaTransport",
}


@dataclass
class TransportInfo:
    """One row of ``polyrpc transports``."""

    scheme: str
    source: str
    usable: bool
    reason: str
    description: str


class Registry:
    """Maps URL schemes to transports."""

    def __init__(self) -> None:
        self._targets: dict[str, str] = dict(BUILTIN)
        self._loaded: dict[str, Transport] = {}
        self._load_errors: dict[str, str] = {}
        self._entry_points_read = False

    def register(self, transport: Transport | type[Transport], scheme: str | None = None) -> None:
        """Register a transport instance or class (third parties may also use entry points)."""
        instance = transport() if isinstance(transport, type) else transport
        name = scheme or instance.scheme
        self._targets[name] = f"{type(instance).__module__}:{type(instance).__qualname__}"
        self._loaded[name] = instance
        self._load_errors.pop(name, None)

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._targets.setdefault(ep.name, ep.value)

    def schemes(self) -> list[str]:
        """Every registered scheme, usable here or not."""
        self._read_entry_points()
        return sorted(self._targets)

    def _load(self, scheme: str) -> Transport:
        if scheme in self._loaded:
            return self._loaded[scheme]
        if scheme in self._load_errors:
            raise TransportUnavailable(self._load_errors[scheme])
        target = self._targets[scheme]
        module_name, _, attr = target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:  # a broken plugin must not break the others
            message = (
                f"{scheme}: could not load {target} ({type(exc).__name__}: {exc}); "
                "reinstall the package that provides it"
            )
            self._load_errors[scheme] = message
            raise TransportUnavailable(message) from exc
        transport = obj() if isinstance(obj, type) else obj
        if not isinstance(transport, Transport):
            message = f"{scheme}: {target} is not a polyrpc Transport"
            self._load_errors[scheme] = message
            raise TransportUnavailable(message)
        self._loaded[scheme] = transport
        return transport

    def get(self, scheme: str) -> Transport:
        """The transport for ``scheme`` (loaded, but not checked for availability)."""
        self._read_entry_points()
        if scheme not in self._targets:
            raise InvalidAddress(
                f"unknown transport scheme {scheme!r}; registered: {', '.join(self.schemes())}"
            )
        return self._load(scheme)

    def resolve(self, url: str):
        """Parse ``url`` into (transport, address); raises InvalidAddress or TransportUnavailable."""
        scheme, _ = split_scheme(url)
        transport = self.get(scheme)
        address = transport.parse(url)
        transport.check_available()
        return transport, address

    def describe(self) -> list[TransportInfo]:
        """Every scheme with whether it works here and, if not, why and how to fix it."""
        rows = []
        for scheme in self.schemes():
            source = "built-in" if BUILTIN.get(scheme) == self._targets[scheme] else "plugin"
            try:
                transport = self._load(scheme)
            except TransportUnavailable as exc:
                rows.append(TransportInfo(scheme, source, False, str(exc), ""))
                continue
            reason = transport.unavailable_reason()
            rows.append(
                TransportInfo(scheme, source, reason is None, reason or "", transport.description)
            )
        return rows


registry = Registry()
"""The process-wide registry used by :func:`polyrpc.dial`, :func:`polyrpc.listen` and the CLI."""
