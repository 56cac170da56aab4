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
from .core.registry import registry

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
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
