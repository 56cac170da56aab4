"""The ``etcd://host:port/name`` discovery backend and registration with a lease, on the
aetcd client (``pip install polyrpc[etcd]``).

A server is the key ``<prefix>/<name>/<instance id>`` (prefix ``/polyrpc/services``,
``?prefix=`` to change it) holding JSON ``{"urls": [...], "weight": n, "metadata": {...}}``,
attached to a lease the server keeps alive: a server that dies without deregistering
disappears when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import ConnectFailed, InvalidAddress
from .discovery import Discovery, Instance, Registration
from .health import Backoff

try:
    import aetcd
except ImportError as exc:  # reported by the discovery registry when etcd:// is used
    raise ImportError(
        "the etcd discovery backend needs aetcd: pip install 'polyrpc[etcd]'"
    ) from exc

log = logging.getLogger("polyrpc.cluster")

DEFAULT_PREFIX = "/polyrpc/services"


class EtcdDiscovery(Discovery):
    """The servers registered under one name in etcd, watched by key prefix."""

    def __init__(self, host: str, port: int, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.key_prefix = f"{prefix.rstrip('/')}/{name}/".encode()
        self._clients: list[aetcd.Client] = []

    @classmethod
    def from_url(cls, url: str) -> EtcdDiscovery:
        """Parse ``etcd://host:port/name[?prefix=/polyrpc/services]``."""
        parts = urlsplit(url)
        name = parts.path.strip("/")
        if not parts.hostname or not name:
            raise InvalidAddress(f"{url!r}: expected etcd://host:port/service-name")
        prefix = parse_qs(parts.query).get("prefix", [DEFAULT_PREFIX])[0]
        return cls(parts.hostname, parts.port or 2379, name, prefix)

    def _client(self) -> aetcd.Client:
        # a channel of its own: gRPC shares connections between channels by default, and a
        # new client would inherit the failure backoff of one that saw etcd down
        client = aetcd.Client(self.host, self.port, options={"grpc.use_local_subchannel_pool": 1})
        self._clients.append(client)
        return client

    def _instance(self, key: bytes, value: bytes) -> Instance | None:
        instance_id = key[len(self.key_prefix) :].decode()
        try:
            entry: dict[str, Any] = json.loads(value)
            return Instance(
                id=instance_id,
                urls=tuple(entry["urls"]),
                weight=int(entry.get("weight", 1)),
                metadata=dict(entry.get("metadata", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the malformed etcd entry %s: %s", key.decode(), exc)
            return None

    async def watch(self) -> AsyncGenerator[list[Instance], None]:
        """List the prefix, then follow its changes from the revision listed; if etcd goes
        away the last list stands while it reconnects with backoff."""
        backoff = Backoff(0.1, 5.0)
        while True:
            client = self._client()
            try:
                listed = await client.get_prefix(self.key_prefix)
                live: dict[str, Instance] = {}
                for kv in listed:
                    instance = self._instance(kv.key, kv.value)
                    if instance is not None:
                        live[instance.id] = instance
                yield list(live.values())
                backoff.reset()
                watch = await client.watch_prefix(
                    self.key_prefix, start_revision=listed.header.revision + 1
                )
                async for event in watch:
                    instance_id = event.kv.key[len(self.key_prefix) :].decode()
                    if event.kind == aetcd.EventKind.DELETE:
                        live.pop(instance_id, None)
                    elif (instance := self._instance(event.kv.key, event.kv.value)) is not None:
                        live[instance.id] = instance
                    yield list(live.values())
            except aetcd.exceptions.ClientError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "etcd %s:%d: %s; watching again in %.1fs", self.host, self.port, exc, delay
                )
                await asyncio.sleep(delay)
            finally:
                self._clients.remove(client)
                with contextlib.suppress(Exception):
                    await client.close()

    async def register(self, instance: Instance, ttl: float) -> EtcdRegistration:
        registration = EtcdRegistration(self._client(), self.key_prefix, instance, ttl)
        await registration.start()
        return registration

    async def close(self) -> None:
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                await client.close()


class EtcdRegistration(Registration):
    """One server's key under a lease of ``ttl`` seconds, refreshed every third of it; if
    the lease was lost (etcd restarted, a long pause) it is granted again and the key
    written again."""

    def __init__(
        self, client: aetcd.Client, key_prefix: bytes, instance: Instance, ttl: float
    ) -> None:
        if ttl < 1:
            raise ValueError("etcd leases last whole seconds: ttl must be at least 1")
        self.client = client
        self.key = key_prefix + instance.id.encode()
        self.value = json.dumps(
            {"urls": list(instance.urls), "weight": instance.weight, "metadata": instance.metadata}
        ).encode()
        self.ttl = int(ttl)
        self.lease: Any = None
        self._keepalive: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._grant()
        except aetcd.exceptions.ClientError as exc:
            await self.client.close()
            raise ConnectFailed(f"registering at etcd failed: {exc}") from exc
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _grant(self) -> None:
        self.lease = await self.client.lease(self.ttl)
        await self.client.put(self.key, self.value, lease=self.lease)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                reply = await self.lease.refresh()
                if reply.TTL <= 0:
                    log.warning("etcd lease of %s expired; registering again", self.key.decode())
                    await self._grant()
            except aetcd.exceptions.ClientError as exc:
                log.warning("etcd keepalive of %s failed: %s", self.key.decode(), exc)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        with contextlib.suppress(aetcd.exceptions.ClientError):
            await self.lease.revoke()
        await self.client.close()
