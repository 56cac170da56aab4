"""Helpers more than one transport uses: UDP sockets (quic, kcp) and self-signed
certificates (tls, quic). Imports only polyrpc.errors and polyrpc.stream."""
