"""The exception hierarchy: every error polyrpc raises is a PolyrpcError."""

from __future__ import annotations


class PolyrpcError(Exception):
    """Base class of every error raised by polyrpc."""


class InvalidAddress(PolyrpcError, ValueError):
    """A transport URL could not be parsed or names something that does not exist."""


class TransportUnavailable(PolyrpcError):
    """The transport exists but cannot work on this machine; the message says why and how to fix it."""


class ConnectionLost(PolyrpcError, ConnectionError):
    """The connection closed or broke while an operation was pending or attempted."""


class ProtocolError(PolyrpcError):
    """The peer sent bytes that are not valid polyrpc frames, or broke the protocol's rules."""


class CallTimeout(PolyrpcError, TimeoutError):
    """A request did not complete before its deadline."""


class RemoteError(PolyrpcError):
    """The remote side reported an error while handling a request.

    ``type_name`` is the remote exception's class name, ``code`` a stable error code
    (see polyrpc.errors.ErrorCode) and ``remote_traceback`` is set only when the
    server opted in to sending tracebacks.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        code: str = "handler_error",
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.code = code
        self.remote_traceback = remote_traceback


class MessageTooLarge(PolyrpcError, ValueError):
    """A message, request, reply or stream item is larger than the peer accepts.

    Raised before anything is written, for that call only: the connection and every
    other call on it go on. ``size`` is the frame's size in bytes, ``limit`` the peer's
    ``max_frame`` (announced in its HELLO; 64 MiB for peers that announce none).
    """

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(
            f"{what} of {size} bytes exceeds the peer's limit of {limit} bytes "
            "(max_frame, announced in its HELLO)"
        )
        self.size = size
        self.limit = limit


class ConnectFailed(ConnectionLost):
    """A connection could not be established (refused, unreachable, handshake failed)."""


class HandshakeError(ConnectFailed):
    """The peer was reached but the security or protocol handshake failed.

    ``reason`` is a stable short name: ``untrusted_certificate``,
    ``hostname_mismatch``, ``fingerprint_mismatch``, ``alpn``, ``version``,
    ``bad_token``, ``not_polyrpc``, ``tls``, ``too_many_connections``,
    ``too_many_handshakes`` or ``protocol_error``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectTimeout(ConnectFailed, CallTimeout):
    """Connecting (including the handshake) took longer than the connect timeout."""
