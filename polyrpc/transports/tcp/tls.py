"""TLS for the socket streams on asyncio's own event loops, with receive memory that follows the load.

asyncio's ``SSLProtocol`` allocates (and zeroes) a 256 KiB ciphertext buffer per connection
before the handshake even starts, and its OpenSSL memory BIO keeps the largest chunk ever
written to it: over 300 KiB per connection, handshaking or idle. :class:`LeanTlsProtocol`
starts with a small buffer, grows it to asyncio's size when a read fills it (data is
queued), gives it back after a run of small reads, and feeds OpenSSL in slices so its BIO
stays small. The TLS state machine
itself is asyncio's, unchanged. CPython sets SSL_MODE_RELEASE_BUFFERS on every context, so
OpenSSL's own record buffers are freed while a connection is idle.

uvloop keeps its own TLS protocol (compiled; a Python one there costs ~40% of tls latency):
its 256 KiB buffer is malloc'ed and only the pages a read reaches become resident.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

TLS_READ_MIN = 4 << 10
"""The receive buffer a connection starts with and returns to when idle."""
TLS_READ_MAX = 256 << 10
"""The most a bulk transfer grows it to (asyncio's fixed size)."""
TLS_BIO_SLICE = 32 << 10
"""Ciphertext handed to OpenSSL at once (its memory BIO keeps the largest such write)."""
TLS_QUIET_READS = 16
"""Reads in a row smaller than TLS_READ_MIN after which a grown buffer is given back."""


def lean_tls(loop: asyncio.AbstractEventLoop) -> bool:
    """True where the loop's own TLS would be asyncio's SSLProtocol (not uvloop's)."""
    return isinstance(loop, asyncio.BaseEventLoop)


class LeanTlsProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol with a receive buffer that grows on demand and shrinks when idle."""

    max_size = TLS_READ_MIN  # what SSLProtocol.__init__ allocates
    # (typeshed describes the pre-3.11 SSLProtocol: the attributes used here are untyped)
    _incoming: ssl.MemoryBIO
    _state: Any

    def get_buffer(self, n: int) -> memoryview:
        return self._ssl_buffer_view

    _quiet_reads = 0

    def buffer_updated(self, nbytes: int) -> None:
        size = len(self._ssl_buffer)
        data = self._ssl_buffer_view[:nbytes]
        for start in range(0, nbytes, TLS_BIO_SLICE):
            if self._transport is None or self._transport.is_closing():
                break  # a fatal error in an earlier slice: the rest is not read
            self._incoming.write(data[start : start + TLS_BIO_SLICE])
            self._process_incoming()
        data.release()
        if nbytes == size < TLS_READ_MAX:  # a full read: data is queued, read it all at once
            self._resize(TLS_READ_MAX)
        elif size > TLS_READ_MIN:
            # small reads in a row: the burst is over, give the memory back
            self._quiet_reads = self._quiet_reads + 1 if nbytes < TLS_READ_MIN else 0
            if self._quiet_reads >= TLS_QUIET_READS:
                self._resize(TLS_READ_MIN)

    def _resize(self, size: int) -> None:
        self._ssl_buffer = bytearray(size)
        self._ssl_buffer_view = memoryview(self._ssl_buffer)
        self._quiet_reads = 0

    def _process_incoming(self) -> None:
        """Advance the TLS state machine on the ciphertext now in the BIO (as asyncio does)."""
        this: Any = self
        state = self._state
        if state == sslproto.SSLProtocolState.DO_HANDSHAKE:
            this._do_handshake()
        elif state == sslproto.SSLProtocolState.WRAPPED:
            this._do_read()
        elif state == sslproto.SSLProtocolState.FLUSHING:
            this._do_flush()
        elif state == sslproto.SSLProtocolState.SHUTDOWN:
            this._do_shutdown()


def tls_server(
    app_factory: Callable[[], asyncio.BufferedProtocol], context: ssl.SSLContext
) -> Callable[[], LeanTlsProtocol]:
    """A protocol factory for ``loop.create_server``: TLS, then ``app_factory()``'s protocol."""
    loop = asyncio.get_running_loop()
    return lambda: LeanTlsProtocol(
        loop,
        app_factory(),
        context,
        None,  # type: ignore[arg-type]
        server_side=True,
    )


async def tls_connect(
    app: asyncio.BufferedProtocol,
    context: ssl.SSLContext,
    server_hostname: str,
    host: str,
    port: int,
) -> None:
    """Connect to ``host:port`` and finish the TLS handshake; ``app`` is then connected.

    Raises ssl.SSLError (handshake) or OSError (connect) like ``loop.create_connection``.
    """
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[Any] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: LeanTlsProtocol(
            loop, app, context, handshake, server_side=False, server_hostname=server_hostname
        ),
        host,
        port,
    )
    try:
        await handshake
    except BaseException:
        transport.close()
        raise
