"""A Stream over an asyncio transport (TCP, TLS and unix sockets share it).

Receives through asyncio's BufferedProtocol so the frame decoder can have the
kernel read straight into its buffers (no per-read bytes object), and writes
by coalescing small buffers while handing large ones to the transport as they are.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from ...errors import ConnectionLost
from ...stream.trait import Buffer, BufferedReceiver, HalfClose, Stream, StreamReceiver

COALESCE_LIMIT = 16 << 10
"""Buffers smaller than this are joined into one write; larger ones are written as they are."""
READ_CHUNK = 256 << 10
CLOSE_TIMEOUT = 10.0


class SocketStream(Stream, HalfClose, asyncio.BufferedProtocol):
    """Stream trait on top of an asyncio transport."""

    def __init__(
        self,
        transport_name: str,
        *,
        half_close: bool = True,
        on_connected: Callable[[SocketStream], None] | None = None,
    ) -> None:
        self.transport_name = transport_name
        self._on_connected = on_connected
        super().__init__()
        self._transport: asyncio.Transport | None = None
        self._half_close = half_close
        self._read_view: memoryview | None = None
        """Allocated on first use: a session receiver reads into its own buffers instead."""
        self._lost_future: asyncio.Future[None] | None = None
        self._eof_sent = False

    # -- asyncio protocol side --------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.write_now = transport.write  # type: ignore[attr-defined]
        self._lost_future = asyncio.get_running_loop().create_future()
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=self.high_water, low=self.low_water
        )
        self.extra["peer"] = _format_peer(transport.get_extra_info("peername"))
        self.extra["local"] = _format_peer(transport.get_extra_info("sockname"))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.extra["tls_version"] = ssl_object.version()
            self.extra["cipher"] = ssl_object.cipher()
            self.extra["peer_cert"] = ssl_object.getpeercert()
            self.extra["alpn"] = ssl_object.selected_alpn_protocol()
        if self._on_connected is not None:
            self._on_connected(self)

    def set_receiver(self, receiver: StreamReceiver) -> None:
        super().set_receiver(receiver)
        if isinstance(receiver, BufferedReceiver):
            # the receiver reads straight from the socket into its own buffers; re-setting
            # the protocol makes event loops that cache these methods (uvloop) see them
            self.get_buffer = receiver.get_buffer  # type: ignore[method-assign,assignment]
            self.buffer_updated = receiver.buffer_updated  # type: ignore[method-assign,assignment]
            if self._transport is not None:
                self._transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._read_view is None:
            self._read_view = memoryview(bytearray(READ_CHUNK))
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._read_view is not None
        self.receiver.data_received(self._read_view[:nbytes])

    def eof_received(self) -> bool:
        self.receiver.eof_received()
        # keep the socket open only while we may still write (half-close)
        return self._half_close and not self._eof_sent

    def pause_writing(self) -> None:
        self._set_writing_paused(True)

    def resume_writing(self) -> None:
        self._set_writing_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.write_now = None
        if self._lost_future is not None and not self._lost_future.done():
            self._lost_future.set_result(None)
        self._connection_lost(exc)

    # -- stream trait ------------------------------------------------------
    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        if self._lost is not None or self._closed:
            self._check_writable()
        transport = self._transport
        assert transport is not None
        if len(buffers) == 1:
            transport.write(buffers[0])
            return
        small: list[Buffer] = []
        for buf in buffers:
            if len(buf) < COALESCE_LIMIT:
                small.append(buf)
                continue
            if small:
                transport.write(b"".join(small) if len(small) > 1 else small[0])
                small = []
            transport.write(buf)
        if small:
            transport.write(b"".join(small) if len(small) > 1 else small[0])

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    @property
    def can_write_eof(self) -> bool:
        return self._transport is not None and self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._check_writable()
        assert self._transport is not None
        if not self._transport.can_write_eof():
            raise ConnectionLost(
                f"{self.transport_name} cannot half-close (TLS has no half-close in asyncio); "
                "use close() instead"
            )
        self.write_now = None
        self._transport.write_eof()
        self._eof_sent = True

    async def close(self) -> None:
        if self._transport is None:
            return
        self._closed = True
        self.write_now = None
        if not self._transport.is_closing():
            self._transport.close()
        assert self._lost_future is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._lost_future), CLOSE_TIMEOUT)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        self._closed = True
        self.write_now = None
        if self._transport is not None:
            self._transport.abort()


def _format_peer(name: Any) -> Any:
    if isinstance(name, tuple) and len(name) >= 2:
        return (name[0], name[1])
    return name


def describe_ssl_error(exc: ssl.SSLError, server_hostname: str | None) -> tuple[str, str]:
    """A readable message and a stable reason for a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "hostname mismatch" in detail.lower() or "ip address mismatch" in detail.lower():
            return (
                f"TLS hostname mismatch: the server's certificate is not valid for "
                f"{server_hostname!r} ({detail}); dial the name in the certificate or set ?sni=",
                "hostname_mismatch",
            )
        return (
            f"untrusted TLS certificate ({detail}); pass the issuing CA with ?ca=/path/ca.pem",
            "untrusted_certificate",
        )
    return f"TLS handshake failed: {exc.reason or exc}", "tls"
