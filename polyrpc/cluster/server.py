"""Servers that register themselves: ``serve(urls, svc, register="etcd://.../arith", ttl=5)``."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from typing import Any

from ..rpc.endpoints import Server, _Opening
from .discovery import Instance, Registration, discovery_registry


def new_instance_id() -> str:
    """A server's id in the registry: host, process and a random part (unique per start)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class RegisteredServer(Server):
    """A :class:`~polyrpc.Server` that publishes its URLs in a registry; closing it
    deregisters first (clients stop choosing it), then closes as a Server does."""

    registration: Registration | None = None
    instance: Instance | None = None

    async def register_at(
        self,
        url: str,
        ttl: float = 5.0,
        *,
        instance_id: str | None = None,
        weight: int = 1,
        metadata: dict[str, str] | None = None,
        advertise: Iterable[str] | None = None,
    ) -> Instance:
        """Register the URLs served (or ``advertise``: what clients should dial when the
        bound ones are not, e.g. a wildcard address) under the name in ``url``."""
        instance = Instance(
            id=instance_id or new_instance_id(),
            urls=tuple(advertise or self.urls),
            weight=weight,
            metadata=metadata or {},
        )
        discovery = discovery_registry.open(url)
        self.registration = await discovery.register(instance, ttl)
        self.instance = instance
        return instance

    async def close(self, timeout: float | None = None) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            await registration.close()
        await super().close(timeout)


def serve(
    urls: str | Iterable[str],
    *services: Any,
    register: str,
    ttl: float = 5.0,
    instance_id: str | None = None,
    weight: int = 1,
    metadata: dict[str, str] | None = None,
    advertise: Iterable[str] | None = None,
    **server_options: Any,
) -> _Opening:
    """Serve ``services`` on ``urls`` as :func:`polyrpc.serve` does, and register them at
    ``register`` (e.g. ``etcd://127.0.0.1:2379/arith``) with a lease of ``ttl`` seconds."""

    async def make() -> RegisteredServer:
        server = RegisteredServer(**server_options)
        try:
            for service in services:
                if isinstance(service, tuple) and len(service) == 2:
                    server.register(service[1], service[0])
                else:
                    server.register(service)
            for url in [urls] if isinstance(urls, str) else list(urls):
                await server.start(url)
            await server.register_at(
                register,
                ttl,
                instance_id=instance_id,
                weight=weight,
                metadata=metadata,
                advertise=advertise,
            )
        except BaseException:
            await server.close()
            raise
        return server

    return _Opening(make)
