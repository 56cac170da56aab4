"""polyrpc: messages and remote calls over a transport chosen by URL."""

from collections.abc import Iterable
from typing import Any

from . import cluster
from .errors import (
    CallTimeout,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HandshakeError,
    InvalidAddress,
    MessageTooLarge,
    PolyrpcError,
    ProtocolError,
    RemoteError,
    TransportUnavailable,
)
from .messages import Connection, Message, MessageListener, dial, listen
from .rpc.connection import CallContext, current_context
from .rpc.endpoints import Client, Server, _Opening
from .rpc.endpoints import connect as connect_one
from .rpc.endpoints import serve as serve_only
from .rpc.middleware import Call, CallNext, Middleware, limit_concurrency, log_calls, retry
from .session.session import SessionConfig
from .stream.registry import registry
from .wire.frames import Limits

__version__ = "0.1.0"


def connect(url: str, *, reconnect: bool = False, **options: Any) -> _Opening:
    """Connect to the server at ``url`` (a :class:`Client`, see
    :func:`polyrpc.rpc.endpoints.connect`); to a whole service by a discovery URL
    (``list://``, ``etcd://``), or to one server with ``reconnect=True``: a
    :class:`~polyrpc.cluster.ClusterClient` (see docs/cluster.md)."""
    if cluster.is_cluster_url(url, reconnect):
        return cluster.connect(url, reconnect=reconnect, **options)
    return connect_one(url, **options)


def serve(
    urls: str | Iterable[str], *services: Any, register: str | None = None, **options: Any
) -> _Opening:
    """Start a :class:`Server` for ``services`` on ``urls``; with ``register`` (e.g.
    ``etcd://127.0.0.1:2379/arith``, and ``ttl=``) it also registers them for clients of
    the service (see :func:`polyrpc.cluster.serve`)."""
    if register is not None:
        return cluster.serve(urls, *services, register=register, **options)
    return serve_only(urls, *services, **options)


__all__ = [
    "Call",
    "CallContext",
    "CallNext",
    "CallTimeout",
    "Client",
    "ConnectFailed",
    "ConnectTimeout",
    "Connection",
    "ConnectionLost",
    "HandshakeError",
    "InvalidAddress",
    "Limits",
    "Message",
    "MessageListener",
    "MessageTooLarge",
    "Middleware",
    "PolyrpcError",
    "ProtocolError",
    "RemoteError",
    "Server",
    "SessionConfig",
    "TransportUnavailable",
    "connect",
    "current_context",
    "dial",
    "limit_concurrency",
    "listen",
    "log_calls",
    "registry",
    "retry",
    "serve",
]
