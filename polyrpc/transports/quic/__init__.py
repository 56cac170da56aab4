"""The ``quic`` transport: QUIC (RFC 9000) with TLS 1.3 on aioquic's sans-IO QuicConnection.

``quic@host:port?ca=..`` dials, ``quic@host:port?cert=..&key=..`` listens. The
socket glue is ours (see :mod:`.udp`), each write travels on its own QUIC stream
(see :mod:`.connection`), and certificates are always verified unless the
client opts out with ``?insecure=1`` (warned) or pins ``?fingerprint=``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import struct
import time
import warnings
from pathlib import Path
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.tls import SessionTicket
from cryptography.hazmat.primitives import serialization

from ...errors import ConnectFailed, HandshakeError, InvalidAddress
from ...stream.address import Address
from ...stream.trait import DEFAULT_HIGH_WATER, Listener, StreamHandler
from ...stream.transport import (
    Option,
    Transport,
    boolean,
    choice,
    existing_file,
    integer,
    number,
    text,
)
from .._shared import REUSE_PORT
from .._shared.certs import certificate_fingerprint, self_signed_certificate
from .._shared.udp import bind_udp
from . import aioquic_private
from .connection import Driver, QuicStream
from .udp import UdpEndpoint, make_socket

ALPN = "polyrpc/1"
CID_LENGTH = 8
MIN_INITIAL_SIZE = 1200
LOOPBACK_DATAGRAM = 16384
"""Datagram size on loopback (MTU 64 KiB). Also the most aioquic can build: it writes
frame lengths as 2-byte varints (< 16384), so larger packets would corrupt frames."""
NETWORK_DATAGRAM = 1350
"""Datagram size elsewhere: fits common 1500-byte paths with IPv6 and tunnels."""

RETRY_WHEN_HANDSHAKING = 8
"""With ``retry=auto``, Initials from unvalidated addresses get a stateless Retry once this many
connections are in the handshake (a spoofed flood then costs one small packet per Initial)."""
TOKEN_LIFETIME = 10.0
"""Seconds a Retry token stays valid (the client echoes it within one round trip)."""
_TOKEN_HEAD = struct.Struct("!IB")  # issue time (unix seconds), original DCID length
_TOKEN_MAC = 16

__all__ = ["ALPN", "QuicListener", "QuicStream", "QuicTransport", "development_certificate"]


def _fingerprint_text(value: str) -> str:
    cleaned = value.replace(":", "").replace(" ", "").upper()
    if len(cleaned) != 64 or any(c not in "0123456789ABCDEF" for c in cleaned):
        raise ValueError("expected a SHA-256 fingerprint: 64 hex digits, colons optional")
    return cleaned


OPTIONS = {
    "ca": Option(existing_file, "client: CA bundle (PEM) to trust instead of the system CAs"),
    "cert": Option(existing_file, "server: certificate chain (PEM)"),
    "key": Option(existing_file, "server: private key (PEM) for cert"),
    "sni": Option(text, "client: server name to send and verify instead of the URL's host"),
    "insecure": Option(boolean, "client: skip certificate verification (warned)", False),
    "reuse_port": REUSE_PORT,
    "fingerprint": Option(
        _fingerprint_text, "client: accept only this SHA-256 certificate fingerprint (pinning)"
    ),
    "timeout": Option(
        number(0.1, 600),
        "seconds a handshake may take (client: waiting; server: then dropped)",
        5.0,
    ),
    "idle": Option(number(0.2, 86400), "seconds without packets before the connection dies", 30.0),
    "keepalive": Option(
        number(0, 86400), "seconds between keepalive PINGs when idle (0: none)", 10.0
    ),
    "probe": Option(
        number(0, 86400),
        "seconds of silence while data is moving before a PING checks the peer (0: off)",
        1.0,
    ),
    "window": Option(
        integer(64 << 10, 1 << 30),
        "flow-control window in bytes (per connection and stream)",
        16 << 20,
    ),
    "cc": Option(choice("reno", "cubic"), "congestion control algorithm", "cubic"),
    "mtu": Option(
        integer(1200, LOOPBACK_DATAGRAM),
        "largest UDP payload to send (default: 16384 on loopback, 1350 elsewhere)",
    ),
    "buffer": Option(
        integer(64 << 10, 1 << 30), "bytes of unacknowledged data before writers wait", None
    ),
    "retry": Option(
        choice("auto", "always", "never"),
        "server: validate client addresses with a stateless Retry: always, never, or auto "
        f"(once {RETRY_WHEN_HANDSHAKING} connections are in the handshake)",
        "auto",
    ),
    "max_handshaking": Option(
        integer(1, 1 << 20),
        "server: most connections in the QUIC handshake at once (more are refused)",
        256,
    ),
}


def development_certificate(directory: Path, host: str) -> tuple[Path, Path, str]:
    """Write a self-signed certificate for ``host`` (+ localhost) and return (cert, key, SHA-256).

    For ``polyrpc serve quic@...`` without ``?cert=``: print the fingerprint so that
    clients can pin it with ``?fingerprint=``.
    """
    names = [host] if host not in ("0.0.0.0", "::", "") else []
    names += [n for n in ("localhost", "127.0.0.1", "::1") if n not in names]
    cert, key = self_signed_certificate(directory, names)
    return cert, key, certificate_fingerprint(cert.read_bytes())


def with_development_certificate(url: str, directory: Path) -> tuple[str, str | None]:
    """Add a fresh self-signed certificate to a quic listen URL that has none.

    Returns the URL to listen on and the certificate's fingerprint (None if the URL
    already named a certificate).
    """
    address = QuicTransport().parse(url)
    if address.options.get("cert"):
        return url, None
    cert, key, fingerprint = development_certificate(directory, address.host)
    return str(address.with_options(cert=str(cert), key=str(key))), fingerprint


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _datagram_size(opts: dict[str, Any], host: str) -> int:
    if opts["mtu"]:
        return opts["mtu"]
    return LOOPBACK_DATAGRAM if _is_loopback(host) else NETWORK_DATAGRAM


def _configuration(
    opts: dict[str, Any], *, is_client: bool, datagram_size: int
) -> QuicConfiguration:
    window = opts["window"]
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=opts["idle"],
        max_data=window,
        max_stream_data=window,
        congestion_control_algorithm=opts["cc"],
        max_datagram_size=datagram_size,
        connection_id_length=CID_LENGTH,
    )


def _high_water(opts: dict[str, Any]) -> int:
    return opts["buffer"] or max(DEFAULT_HIGH_WATER, opts["window"] // 4)


_session_tickets: dict[tuple[str, int, str, str | None], tuple[SessionTicket, Any]] = {}
"""Client-side TLS session tickets, for fast reconnects: by (host, port, server name, trust)
(the CA file when the chain is verified, None when it is not), each with the certificate
that the full handshake behind it presented (a resumed handshake presents none)."""


def _system_ca_file() -> str | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None  # aioquic falls back to certifi


def _der_fingerprint(stream: QuicStream) -> str | None:
    cert = stream.extra.get("peer_cert")
    if cert is None:
        return None
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return certificate_fingerprint(pem)


class _ClientDriver(Driver):
    """A connected UDP socket serving one client connection."""

    def __init__(self) -> None:
        self.endpoint: UdpEndpoint | None = None
        self.stream: QuicStream | None = None
        self.error: OSError | None = None

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.endpoint is not None:
            self.endpoint.send(datagrams)

    def cid_issued(self, cid: bytes, stream: QuicStream) -> None:
        """Nothing to route: the socket carries this one connection."""

    def cid_retired(self, cid: bytes) -> None:
        """Nothing to route: the socket carries this one connection."""

    def established(self, stream: QuicStream) -> None:
        """Nothing to hand over: the dialer awaits the stream's handshake itself."""

    def datagrams(self, batch: list[tuple[bytes, Any]]) -> None:
        stream = self.stream
        if stream is None:
            return
        now = stream.loop.time()
        for data, address in batch:
            stream.datagram_received(data, address, now)
        stream.process()

    def socket_error(self, exc: OSError) -> None:
        stream = self.stream
        if stream is None:
            return
        if not stream.handshake.done():
            self.error = exc
            stream.handshake.set_exception(exc)
        elif isinstance(exc, ConnectionRefusedError):
            stream.peer_refused()

    def finished(self, stream: QuicStream) -> None:
        # the endpoint calls back into this driver: letting go of both frees them at once
        endpoint, self.endpoint, self.stream = self.endpoint, None, None
        if endpoint is not None:
            endpoint.close()


class QuicListener(Listener, Driver):
    """One UDP socket accepting QUIC connections, routing datagrams by connection ID."""

    def __init__(
        self,
        address: Address,
        configuration: QuicConfiguration,
        opts: dict[str, Any],
        on_stream: StreamHandler,
    ) -> None:
        super().__init__(address)
        self._configuration = configuration
        self._opts = opts
        self._on_stream = on_stream
        self._routes: dict[bytes, QuicStream] = {}
        self._handshaking: dict[QuicStream, asyncio.TimerHandle] = {}
        self._token_key = os.urandom(32)
        self.retries = 0
        """Retry packets sent (stateless: no connection existed for them)."""
        self.refused = 0
        """Validated Initials refused because ``max_handshaking`` connections were handshaking."""
        self._cids: dict[QuicStream, set[bytes]] = {}
        self._tickets: dict[bytes, SessionTicket] = {}
        self.endpoint: UdpEndpoint | None = None
        self.streams: set[QuicStream] = set()
        self._peers: dict[tuple[str, int], QuicStream] = {}
        self.dropped = 0
        self._accepting = True
        self._loop = asyncio.get_running_loop()

    # -- datagrams -----------------------------------------------------------
    def datagrams(self, batch: list[tuple[bytes, Any]]) -> None:
        now = self._loop.time()  # (asyncio.get_running_loop() costs a getpid() syscall)
        touched: dict[QuicStream, None] = {}
        for data, address in batch:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except Exception:  # not QUIC: drop silently, garbage must not hurt
                self.dropped += 1
                continue
            stream = self._routes.get(header.destination_cid)
            if stream is None:
                stream = self._new_connection(header, data, address)
                if stream is None:
                    continue
            try:
                stream.datagram_received(data, address, now)
            except Exception:  # a malformed packet aioquic did not expect
                self.dropped += 1
                continue
            touched[stream] = None
        for stream in touched:
            stream.process()

    def _new_connection(self, header: Any, data: bytes, address: Any) -> QuicStream | None:
        if (
            header.version is not None
            and header.version not in self._configuration.supported_versions
        ):
            if self.endpoint is not None and len(data) >= MIN_INITIAL_SIZE:
                self.endpoint.send(
                    [
                        (
                            encode_quic_version_negotiation(
                                source_cid=header.destination_cid,
                                destination_cid=header.source_cid,
                                supported_versions=self._configuration.supported_versions,
                            ),
                            address,
                        )
                    ]
                )
            return None
        if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_SIZE:
            self.dropped += 1
            return None
        if self.endpoint is None or not self._accepting:
            return None
        original_cid = header.destination_cid
        retry_cid: bytes | None = None
        if header.token:
            original = self._validate_token(header.token, address, header.destination_cid)
            if original is None:  # forged, expired, or from another address: RFC 9000 8.1.3
                self._close_statelessly(header, address, QuicErrorCode.INVALID_TOKEN)
                self.dropped += 1
                return None
            original_cid, retry_cid = original, header.destination_cid
        elif self._opts["retry"] == "always" or (
            self._opts["retry"] == "auto"
            and len(self._handshaking) >= min(RETRY_WHEN_HANDSHAKING, self._opts["max_handshaking"])
        ):
            self._send_retry(header, address)
            return None
        if len(self._handshaking) >= self._opts["max_handshaking"]:
            self.refused += 1
            if retry_cid is not None or self._opts["retry"] == "never":
                # a validated address (or a server that never validates): say why
                self._close_statelessly(header, address, QuicErrorCode.CONNECTION_REFUSED)
            return None
        connection = QuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
            session_ticket_fetcher=self._fetch_ticket,
            session_ticket_handler=self._store_ticket,
        )
        stream = QuicStream(
            connection,
            self,
            address,
            window=self._opts["window"],
            keepalive=self._opts["keepalive"],
            high_water=_high_water(self._opts),
            probe=self._opts["probe"],
            extra={"local": self.endpoint.local_address[:2]},
        )
        self._cids[stream] = set()
        self.cid_issued(header.destination_cid, stream)
        self.cid_issued(connection.host_cid, stream)
        self._handshaking[stream] = self._loop.call_later(
            self._opts["timeout"], self._handshake_expired, stream
        )
        return stream

    def _handshake_expired(self, stream: QuicStream) -> None:
        """A connection still in the handshake after ``timeout`` is dropped (frees its slot)."""
        if self._handshaking.pop(stream, None) is not None:
            stream.abort()

    # -- address validation (RFC 9000 8.1.2), stateless ---------------------------------
    def _token_mac(self, issued: bytes, address: Any, original: bytes, retry_cid: bytes) -> bytes:
        peer = _peer_key(address)
        message = b"|".join([issued, peer[0].encode(), str(peer[1]).encode(), original, retry_cid])
        return hmac.new(self._token_key, message, hashlib.sha256).digest()[:_TOKEN_MAC]

    def _send_retry(self, header: Any, address: Any) -> None:
        """Answer an Initial with a Retry carrying a token bound to the address; no state."""
        retry_cid = os.urandom(CID_LENGTH)
        head = _TOKEN_HEAD.pack(int(time.time()), len(header.destination_cid))
        token = (
            head
            + header.destination_cid
            + self._token_mac(head, address, header.destination_cid, retry_cid)
        )
        packet = encode_quic_retry(
            version=header.version,
            source_cid=retry_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )
        self.retries += 1
        if self.endpoint is not None:
            self.endpoint.send([(packet, address)])

    def _validate_token(self, token: bytes, address: Any, retry_cid: bytes) -> bytes | None:
        """The original destination CID if ``token`` is ours, fresh and for this address."""
        if len(token) < _TOKEN_HEAD.size + _TOKEN_MAC:
            return None
        issued, length = _TOKEN_HEAD.unpack_from(token)
        head = token[: _TOKEN_HEAD.size]
        original = token[_TOKEN_HEAD.size : _TOKEN_HEAD.size + length]
        mac = token[_TOKEN_HEAD.size + length :]
        if len(original) != length or len(mac) != _TOKEN_MAC:
            return None
        if not 0 <= time.time() - issued <= TOKEN_LIFETIME:
            return None
        if not hmac.compare_digest(mac, self._token_mac(head, address, original, retry_cid)):
            return None
        return original

    def _close_statelessly(self, header: Any, address: Any, error: int) -> None:
        """An Initial carrying CONNECTION_CLOSE (no connection state is created for it)."""
        if self.endpoint is None:
            return
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        builder = QuicPacketBuilder(
            host_cid=header.destination_cid,
            peer_cid=header.source_cid,
            version=header.version,
            is_client=False,
            max_datagram_size=MIN_INITIAL_SIZE,
        )
        builder.start_packet(QuicPacketType.INITIAL, crypto)
        frame = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=16)
        frame.push_uint_var(error)
        frame.push_uint_var(QuicFrameType.PADDING)  # the frame type that caused it: none
        frame.push_uint_var(0)  # no reason phrase
        datagrams, _ = builder.flush()
        self.endpoint.send([(datagram, address) for datagram in datagrams])

    def _fetch_ticket(self, label: bytes) -> SessionTicket | None:
        """A ticket resumes one session; unknown ones (from before a restart) give None."""
        return self._tickets.pop(label, None)

    def _store_ticket(self, ticket: SessionTicket) -> None:
        if len(self._tickets) > 4096:
            self._tickets.pop(next(iter(self._tickets)))
        self._tickets[ticket.ticket] = ticket

    def socket_error(self, exc: OSError) -> None:
        """Errors on an unconnected server socket concern one peer only: ignore them."""

    def unreachable(self, address: Any) -> None:
        """ICMP port unreachable from ``address``: probe the connections with that peer."""
        stream = self._peers.get(_peer_key(address))
        if stream is not None:
            stream.peer_refused()

    # -- Driver ----------------------------------------------------------------
    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.endpoint is not None:
            self.endpoint.send(datagrams)

    def cid_issued(self, cid: bytes, stream: QuicStream) -> None:
        self._routes[cid] = stream
        self._cids.setdefault(stream, set()).add(cid)

    def cid_retired(self, cid: bytes) -> None:
        stream = self._routes.pop(cid, None)
        if stream is not None:
            self._cids.get(stream, set()).discard(cid)

    def established(self, stream: QuicStream) -> None:
        timer = self._handshaking.pop(stream, None)
        if timer is not None:
            timer.cancel()
        self.streams.add(stream)
        self._peers[_peer_key(stream.peer_address)] = stream
        self._on_stream(stream)

    def finished(self, stream: QuicStream) -> None:
        timer = self._handshaking.pop(stream, None)
        if timer is not None:
            timer.cancel()
        for cid in self._cids.pop(stream, ()):
            if self._routes.get(cid) is stream:
                del self._routes[cid]
        self.streams.discard(stream)
        key = _peer_key(stream.peer_address)
        if self._peers.get(key) is stream:
            del self._peers[key]
        if not self._accepting and not self.streams and self.endpoint is not None:
            self.endpoint.close()

    @property
    def handshaking(self) -> int:
        """Connections in the QUIC handshake now."""
        return len(self._handshaking)

    async def close(self) -> None:
        """Stop accepting; established connections keep the socket until they end."""
        self._accepting = False
        for stream in list(self._handshaking):
            self._handshake_expired(stream)
        if not self.streams and self.endpoint is not None:
            self.endpoint.close()


class QuicTransport(Transport):
    """QUIC with TLS 1.3 (aioquic), one QUIC stream per write, ALPN polyrpc/1."""

    scheme = "quic"
    description = "QUIC + TLS 1.3 (aioquic); independent calls on separate QUIC streams"
    options = OPTIONS
    library_loggers = ("quic", "http3")
    """aioquic logs each failed handshake itself."""

    def unavailable_reason(self) -> str | None:
        """Why the installed aioquic cannot serve (a private attribute it relies on is gone)."""
        return aioquic_private.unavailable_reason()

    async def dial(self, address: Address) -> QuicStream:
        self.check_available()
        opts = self.parse_options(address)
        if address.port == 0:
            raise InvalidAddress(
                f"cannot dial port 0 in {address}: port 0 only works for listening"
            )
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectFailed(
                f"could not resolve {address.host!r}: {exc.strerror or exc}"
            ) from exc
        server_name = opts["sni"] or address.host
        if opts["insecure"] and not opts["fingerprint"]:
            warnings.warn(
                f"{address}: QUIC certificate verification is disabled (insecure=1); "
                "anyone on the path can impersonate the server",
                stacklevel=2,
            )
        deadline = loop.time() + opts["timeout"]
        peers = list(dict.fromkeys((family, peer) for family, _, _, _, peer in infos))
        refused: OSError | None = None
        for family, peer in peers:
            # like TCP's happy path: an address that refuses at once (ICMP) passes to the next
            try:
                return await self._attempt(address, opts, family, peer, server_name, deadline)
            except ConnectionRefusedError as exc:
                refused = exc
            except TimeoutError:
                raise ConnectFailed(
                    f"could not connect to {address}: no QUIC answer within "
                    f"{opts['timeout']:g}s (is a server listening on that UDP port? "
                    "is UDP blocked?)"
                ) from None
            except ConnectFailed:
                raise
            except OSError as exc:
                raise ConnectFailed(
                    f"could not connect to {address}: {exc.strerror or exc}"
                ) from exc
        raise ConnectFailed(
            f"could not connect to {address}: connection refused "
            "(no server listening on that UDP port)"
        ) from refused

    async def _attempt(
        self,
        address: Address,
        opts: dict[str, Any],
        family: int,
        peer: tuple[Any, ...],
        server_name: str,
        deadline: float,
    ) -> QuicStream:
        """One handshake with one resolved address; raw OSError/TimeoutError on failure."""
        loop = asyncio.get_running_loop()
        configuration = _configuration(
            opts, is_client=True, datagram_size=_datagram_size(opts, peer[0])
        )
        configuration.server_name = server_name
        if opts["insecure"] or opts["fingerprint"]:
            configuration.verify_mode = ssl.CERT_NONE
        else:
            configuration.verify_mode = ssl.CERT_REQUIRED
            configuration.cafile = opts["ca"] or _system_ca_file()
        # a ticket only resumes under the trust it was verified with: one from an unverified
        # (pinned or insecure) connection must never skip a later CA check
        ticket_key = (
            address.host,
            address.port,
            server_name,
            None if configuration.verify_mode == ssl.CERT_NONE else configuration.cafile,
        )
        ticket, resumed_cert = _session_tickets.get(ticket_key, (None, None))
        configuration.session_ticket = ticket

        def store_ticket(ticket: SessionTicket) -> None:
            # the certificate of the handshake the ticket continues, so that a resumed
            # connection can still show it (extra["peer_cert"]) and be checked against a pin
            cert = getattr(connection.tls, "_peer_certificate", None) or resumed_cert
            if cert is not None:
                _session_tickets[ticket_key] = (ticket, cert)

        sock = make_socket(family)
        try:
            sock.connect(peer)
        except OSError:
            sock.close()
            raise
        driver = _ClientDriver()
        connection = QuicConnection(
            configuration=configuration, session_ticket_handler=store_ticket
        )
        endpoint = UdpEndpoint(sock, driver.datagrams, driver.socket_error, connected=True)
        driver.endpoint = endpoint
        stream = QuicStream(
            connection,
            driver,
            peer,
            window=opts["window"],
            keepalive=opts["keepalive"],
            high_water=_high_water(opts),
            probe=opts["probe"],
            extra={"local": endpoint.local_address[:2], "server_name": server_name},
        )
        driver.stream = stream
        stream.resumed_cert = resumed_cert
        pin = opts["fingerprint"]
        if pin:
            stream.fingerprint_check = lambda s: _check_pin(s, pin, address)
        connection.connect(peer, now=loop.time())
        stream.transmit()
        try:
            await asyncio.wait_for(
                asyncio.shield(stream.handshake), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            stream.abort()
            if stream.last_receive == stream.created_at:
                raise  # not a single datagram came back
            raise ConnectFailed(
                f"could not connect to {address}: the server answered, but the QUIC handshake "
                f"did not complete within {opts['timeout']:g}s (packets lost on a lossy or "
                "slow path? a longer ?timeout= gives it more time)"
            ) from None
        except BaseException:
            stream.abort()
            raise
        return stream

    async def listen(self, address: Address, on_stream: StreamHandler) -> QuicListener:
        self.check_available()
        opts = self.parse_options(address)
        if not opts["cert"]:
            raise InvalidAddress(
                f"{address}: a quic listener needs ?cert=/path/cert.pem&key=/path/key.pem "
                "(polyrpc serve generates a self-signed one for development)"
            )
        configuration = _configuration(
            opts, is_client=False, datagram_size=_datagram_size(opts, address.host)
        )
        try:
            configuration.load_cert_chain(opts["cert"], opts["key"])
        except (ValueError, OSError) as exc:
            raise InvalidAddress(f"{address}: could not load cert/key: {exc}") from exc
        sock = await bind_udp(address, make_socket, reuse_port=opts["reuse_port"])
        listener = QuicListener(address, configuration, opts, on_stream)
        listener.endpoint = UdpEndpoint(
            sock, listener.datagrams, listener.socket_error, on_unreachable=listener.unreachable
        )
        listener.address = address.with_port(sock.getsockname()[1])
        return listener

    def development_listen_url(self, url: str, workdir: Path) -> tuple[str, str | None]:
        """A listener without ``?cert=`` gets a fresh self-signed certificate."""
        return with_development_certificate(url, workdir)

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        cert, key = self_signed_certificate(workdir, ["localhost", "127.0.0.1"])
        return f"quic@127.0.0.1:0?cert={cert}&key={key}", {"ca": str(cert)}


def _peer_key(address: Any) -> tuple[str, int]:
    """(host, port) of a socket address, IPv4-mapped IPv6 shown as IPv4 (dual-stack sockets)."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, address[1]


def _check_pin(stream: QuicStream, pin: str, address: Address) -> HandshakeError | None:
    actual = _der_fingerprint(stream)
    if actual is not None and hmac.compare_digest(actual.replace(":", ""), pin):
        return None
    return HandshakeError(
        f"quic handshake with {address} failed: certificate fingerprint mismatch "
        f"(expected {pin}, got {actual})",
        "fingerprint_mismatch",
    )
