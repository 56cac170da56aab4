"""polyrpc: messages and remote calls over a transport chosen by URL."""

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
from .rpc.endpoints import Client, Server, connect, serve
from .rpc.middleware import Call, CallNext, Middleware, limit_concurrency, log_calls, retry
from .session.session import SessionConfig
from .stream.registry import registry
from .wire.frames import Limits

__version__ = "0.1.0"

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
