"""polyrpc: messages and remote calls over a transport chosen by URL."""

from .core.endpoints import Client, Server, connect, serve
from .core.errors import (
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
from .core.frames import Limits
from .core.messages import Connection, Message, MessageListener, dial, listen
from .core.registry import registry
from .core.rpc import CallContext, current_context
from .core.session import SessionConfig

__version__ = "0.1.0"

__all__ = [
    "CallContext",
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
    "PolyrpcError",
    "ProtocolError",
    "RemoteError",
    "Server",
    "SessionConfig",
    "TransportUnavailable",
    "connect",
    "current_context",
    "dial",
    "listen",
    "registry",
    "serve",
]
