"""Helpers more than one transport uses: UDP sockets (quic, kcp), the shared-port listening option (tcp, tls, quic, kcp) and self-signed
certificates (tls, quic). Imports only polyrpc.errors and polyrpc.stream."""

from ...stream.transport import Option, boolean

REUSE_PORT = Option(
    boolean,
    "server: share the port with other processes that set it too (SO_REUSEPORT; "
    "polyrpc serve --workers)",
    False,
)
"""The listening option of every transport with a port (tcp, tls, quic, kcp)."""
