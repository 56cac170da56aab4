"""The tcp, tls and unix transports (asyncio sockets), plus the in-process ``mem`` transport."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ConnectFailed, HandshakeError, InvalidAddress
from ...stream.address import PATH, Address
from ...stream.trait import Listener, StreamHandler
from ...stream.transport import Option, Transport, boolean, existing_file, integer, text
from .._shared import REUSE_PORT
from .._shared.certs import self_signed_certificate
from .socket_stream import SocketStream, describe_ssl_error
from .tls import lean_tls, tls_connect, tls_server

KEEPALIVE = Option(integer(0, 86400), "TCP keepalive idle seconds (0 disables keepalive)", 30)
BACKLOG = 1024


class ServerListener(Listener):
    """Listener over an asyncio Server; optionally removes a unix socket file on close."""

    def __init__(self, address: Address, server: asyncio.Server, unlink: str | None = None):
        super().__init__(address)
        self._server = server
        self._unlink = unlink

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        if self._unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unlink)


def _set_keepalive(stream: SocketStream, idle: int) -> None:
    transport = stream._transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or not idle:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _connect_error(address: Address, exc: OSError) -> ConnectFailed:
    reason = exc.strerror or str(exc)
    if isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is a server listening there?)"
    return ConnectFailed(f"could not connect to {address}: {reason}")


class TcpTransport(Transport):
    """Plain TCP with TCP_NODELAY and keepalive."""

    scheme = "tcp"
    description = "TCP (TCP_NODELAY, keepalive)"
    options = {"keepalive": KEEPALIVE, "reuse_port": REUSE_PORT}
    half_close = True

    def _ssl_context(self, address: Address, server_side: bool) -> ssl.SSLContext | None:
        return None

    def _make_stream(self) -> SocketStream:
        return SocketStream(self.scheme, half_close=self.half_close)

    def _accepted(self, on_stream: StreamHandler, keepalive: int) -> SocketStream:
        def connected(stream: SocketStream) -> None:
            _set_keepalive(stream, keepalive)
            on_stream(stream)

        return SocketStream(self.scheme, half_close=self.half_close, on_connected=connected)

    async def dial(self, address: Address) -> SocketStream:
        opts = self.parse_options(address)
        if address.port == 0:
            raise InvalidAddress(
                f"cannot dial port 0 in {address}: port 0 only works for listening"
            )
        loop = asyncio.get_running_loop()
        context = self._ssl_context(address, server_side=False)
        server_hostname = opts.get("sni") or address.host
        try:
            if context is not None and lean_tls(loop):
                stream = self._make_stream()
                await tls_connect(stream, context, server_hostname, address.host, address.port)
            else:
                kwargs: dict[str, Any] = {}
                if context is not None:
                    kwargs = {"ssl": context, "server_hostname": server_hostname}
                _, stream = await loop.create_connection(
                    self._make_stream, address.host, address.port, **kwargs
                )
        except ssl.SSLError as exc:
            message, reason = describe_ssl_error(exc, server_hostname)
            raise HandshakeError(f"could not connect to {address}: {message}", reason) from exc
        except OSError as exc:
            raise _connect_error(address, exc) from exc
        _set_keepalive(stream, opts["keepalive"])
        return stream

    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        opts = self.parse_options(address)
        loop = asyncio.get_running_loop()
        context = self._ssl_context(address, server_side=True)

        def accepted() -> SocketStream:
            return self._accepted(on_stream, opts["keepalive"])

        factory: Callable[[], asyncio.BaseProtocol] = accepted
        if context is not None and lean_tls(loop):
            factory, context = tls_server(accepted, context), None
        try:
            server = await loop.create_server(
                factory,
                address.host,
                address.port,
                ssl=context,
                backlog=BACKLOG,
                reuse_address=True,
                reuse_port=opts["reuse_port"],
            )
        except OSError as exc:
            raise ConnectFailed(f"could not listen on {address}: {exc.strerror or exc}") from exc
        port = server.sockets[0].getsockname()[1]
        return ServerListener(address.with_port(port), server)


class TlsTransport(TcpTransport):
    """TCP with TLS; certificates are verified by default."""

    scheme = "tls"
    description = "TLS over TCP (certificate verification on by default)"
    options = {
        "keepalive": KEEPALIVE,
        "reuse_port": REUSE_PORT,
        "ca": Option(existing_file, "CA bundle (PEM) to trust; server side: require client certs"),
        "cert": Option(existing_file, "certificate chain (PEM): the server's, or a client cert"),
        "key": Option(existing_file, "private key (PEM) for cert"),
        "sni": Option(text, "client: the hostname to verify instead of the URL's host"),
        "insecure": Option(boolean, "client: skip certificate verification (warned)", False),
    }
    half_close = False

    def _ssl_context(self, address: Address, server_side: bool) -> ssl.SSLContext:
        opts = self.parse_options(address)
        if server_side:
            if not opts["cert"]:
                raise InvalidAddress(
                    f"{address}: a tls listener needs ?cert=/path/cert.pem&key=/path/key.pem"
                )
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=opts["ca"])
            if opts["ca"]:
                context.verify_mode = ssl.CERT_REQUIRED
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=opts["ca"])
            if opts["insecure"]:
                warnings.warn(
                    f"{address}: TLS certificate verification is disabled (insecure=1)",
                    stacklevel=3,
                )
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if opts["cert"]:
            context.load_cert_chain(opts["cert"], opts["key"])
        return context

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        cert, key = self_signed_certificate(workdir, ["localhost", "127.0.0.1"])
        return f"tls@127.0.0.1:0?cert={cert}&key={key}", {"ca": str(cert)}


class UnixTransport(TcpTransport):
    """Unix domain stream sockets: ``unix@/path/to.sock``."""

    scheme = "unix"
    description = "unix domain sockets"
    address_kind = PATH
    options = {
        "fd": Option(
            integer(0, 1 << 20),
            "server: listen on this inherited listening socket, which a supervisor bound to "
            "the path (polyrpc serve --workers), instead of binding it",
        )
    }

    async def dial(self, address: Address) -> SocketStream:
        loop = asyncio.get_running_loop()
        try:
            _, stream = await loop.create_unix_connection(self._make_stream, address.target)
        except OSError as exc:
            raise _connect_error(address, exc) from exc
        stream.extra["peer"] = address.target
        return stream

    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        path = address.target
        inherited = self.parse_options(address)["fd"]
        if inherited is None:
            _remove_stale_socket(address)
        loop = asyncio.get_running_loop()

        def connected(stream: SocketStream) -> None:
            stream.extra["local"] = path
            on_stream(stream)

        def accepted() -> SocketStream:
            return SocketStream(self.scheme, on_connected=connected)

        try:
            if inherited is None:
                server = await loop.create_unix_server(accepted, path, backlog=BACKLOG)
            else:
                server = await loop.create_unix_server(accepted, sock=_inherited_unix(inherited))
        except OSError as exc:
            raise ConnectFailed(f"could not listen on {address}: {exc.strerror or exc}") from exc
        # an inherited socket's path belongs to whoever bound it
        return ServerListener(address, server, unlink=path if inherited is None else None)

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        return f"unix@{workdir / 'polyrpc.sock'}", {}


def _inherited_unix(fd: int) -> socket.socket:
    """The listening unix socket behind file descriptor ``fd`` (refusing anything else)."""
    sock = socket.socket(fileno=fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise OSError(f"file descriptor {fd} is not a listening unix stream socket")
    return sock


def _remove_stale_socket(address: Address) -> None:
    """Remove a leftover socket file nobody listens on; refuse to touch anything else."""
    path = address.target
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConnectFailed(f"could not listen on {address}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    finally:
        probe.close()
    raise ConnectFailed(f"could not listen on {address}: another process is listening there")
