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
from .core.registry import registry
from .core.session import SessionConfig

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
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
