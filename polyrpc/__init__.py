"""polyrpc: messages and remote calls over a transport chosen by URL."""

from .core.errors import (
    CallTimeout,
    ConnectFailed,
    ConnectionLost,
    HandshakeError,
    InvalidAddress,
    PolyrpcError,
    ProtocolError,
    RemoteError,
    TransportUnavailable,
)
from .core.errors import ConnectTimeout
from .core.frames import Limits
from .core.messages import Connection, Message, MessageListener, dial, listen
from .core.endpoints import Client, Server, connect, serve
from .core.registry import registry
from .core.rpc import CallContext, current_context
from .core.session import SessionConfig

__version__ = "0.1.0"

__all__ = [
    "CallContext",
    "CallTimeout",
    "Client",
    "Server",
    "connect",
    "current_context",
    "serve",
    "ConnectTimeout",
    "Connection",
    "Limits",
    "Message",
    "MessageListener",
    "SessionConfig",
    "dial",
    "listen",
    "ConnectFailed",
    "ConnectionLost",
    "HandshakeError",
    "InvalidAddress",
    "PolyrpcError",
    "ProtocolError",
    "RemoteError",
    "TransportUnavailable",
    "registry",
]
