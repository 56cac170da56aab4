"""Helpers shared by the datagram transports (quic, kcp): binding a listening UDP socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ...errors import ConnectFailed
from ...stream.address import Address


async def bind_udp(
    address: Address, make_socket: Callable[[int], socket.socket], *, reuse_port: bool = False
) -> socket.socket:
    """Resolve ``address`` for listening and bind a socket from ``make_socket(family)`` to it
    (``reuse_port``: shared with other sockets that set SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            address.host, address.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConnectFailed(f"could not resolve {address.host!r}: {exc.strerror or exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    sock = make_socket(family)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConnectFailed(f"could not listen on {address}: {exc.strerror or exc}") from exc
    return sock
