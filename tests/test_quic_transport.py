"""The quic transport: data both ways, units and ordering, EOF, handshake errors, garbage."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration
from quic_helpers import Server, Sink, certificate, dial, serving

from polyrpc.errors import ConnectFailed, HandshakeError, InvalidAddress
from polyrpc.stream.registry import registry
from polyrpc.transports._shared.certs import certificate_fingerprint
from polyrpc.transports.quic import QuicTransport, with_development_certificate


def test_registered() -> None:
    assert isinstance(registry.get("quic"), QuicTransport)


def test_bad_options() -> None:
    with pytest.raises(InvalidAddress, match="unknown option 'bogus'"):
        QuicTransport().parse("quic@127.0.0.1:1?bogus=1")
    with pytest.raises(InvalidAddress, match="fingerprint"):
        QuicTransport().parse("quic@127.0.0.1:1?fingerprint=abc")


async def test_listener_needs_certificate() -> None:
    transport = QuicTransport()
    with pytest.raises(InvalidAddress, match="needs \\?cert="):
        await transport.listen(transport.parse("quic@127.0.0.1:0"), lambda s: None)


async def test_round_trip_units_and_eof(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        assert client.extra["alpn"] == "polyrpc/1"
        assert client.extra["unordered_units"] is True
        client_sink = Sink()
        client.set_receiver(client_sink)
        await client.send([b"ordered-1|", b"ordered-2|"])
        await client.send([b"unordered|"], ordered=False)
        await client.send([b"x" * 200_000])
        client.write_eof()
        stream, sink = await server.first()
        async with asyncio.timeout(5):
            await sink.eof.wait()
        # EOF comes after every unit; each write arrives whole and in one piece
        assert len(sink.data) == 20 + 10 + 200_000
        assert sink.data.index(b"ordered-1|ordered-2|") < sink.data.index(b"x" * 100)
        assert b"unordered|" in sink.data
        # the other direction still works after the client's half-close
        await stream.send([b"reply"])
        await client_sink.wait_for(5)
        assert bytes(client_sink.data) == b"reply"
        with pytest.raises(ConnectionError):
            client.write([b"after eof"])
        await client.close()


async def test_large_write_is_delivered_intact(tmp_path) -> None:
    payload = bytes(range(256)) * (4 << 12)  # 4 MiB
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        await client.send([payload[:1000], payload[1000:]], ordered=False)
        await client.send([payload])
        _, sink = await server.first()
        await sink.wait_for(2 * len(payload))
        assert bytes(sink.data) == payload + payload
        await client.close()


async def test_graceful_close_reason_reaches_peer(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        await client.send([b"last words"])
        await client.close(reason="shutting down for maintenance")
        _, sink = await server.first()
        async with asyncio.timeout(5):
            await sink.lost.wait()
        assert bytes(sink.data) == b"last words"
        assert sink.eof.is_set()
        assert isinstance(sink.lost_exc, ConnectionError)
        assert "shutting down for maintenance" in str(sink.lost_exc)


async def test_abort_is_a_reset_for_the_peer(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        _, sink = await server.first()
        client.abort()
        async with asyncio.timeout(5):
            await sink.lost.wait()
        assert not sink.eof.is_set()
        assert "reset by the peer" in str(sink.lost_exc)


async def test_untrusted_certificate(tmp_path) -> None:
    other, _ = certificate(tmp_path / "other")
    async with serving(tmp_path) as (server, _cert):
        with pytest.raises(HandshakeError) as info:
            await dial(server.listener.address.port, f"ca={other}&timeout=3")
        assert info.value.reason == "untrusted_certificate"
        # and with the system CAs (no ?ca=): also untrusted, not a hang
        with pytest.raises(HandshakeError) as info:
            await dial(server.listener.address.port, "timeout=3")
        assert info.value.reason == "untrusted_certificate"


async def test_hostname_mismatch(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        with pytest.raises(HandshakeError) as info:
            await dial(server.listener.address.port, f"ca={cert}&sni=other.example&timeout=3")
        assert info.value.reason == "hostname_mismatch"
        assert "other.example" in str(info.value)


async def test_fingerprint_pinning(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        good = certificate_fingerprint(cert.read_bytes())
        stream = await dial(server.listener.address.port, f"fingerprint={good}")
        await stream.close()
        bad = "AB" * 32
        with pytest.raises(HandshakeError) as info:
            await dial(server.listener.address.port, f"fingerprint={bad}&timeout=3")
        assert info.value.reason == "fingerprint_mismatch"


async def test_pinning_holds_on_resumed_connections(tmp_path) -> None:
    """A resumed TLS session presents no certificate: the pin is checked against the one
    stored with the ticket, so every reconnect works and a wrong pin fails every time."""
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        good = certificate_fingerprint(cert.read_bytes())
        resumed = 0
        for _ in range(200):
            stream = await dial(port, f"fingerprint={good}")
            assert certificate_fingerprint_of(stream) == good
            resumed += stream.extra["session_resumed"]
            await stream.send([b"ping"])  # the ticket arrives with the first 1-RTT packets
            await stream.close()
        assert resumed >= 150, f"only {resumed} of 200 reconnects resumed the TLS session"
        bad = "AB" * 32
        for _ in range(5):  # the client holds a ticket for this server: these try resuming
            with pytest.raises(HandshakeError) as info:
                await dial(port, f"fingerprint={bad}&timeout=3")
            assert info.value.reason == "fingerprint_mismatch"
            assert good in str(info.value)  # never "got None"


async def test_ticket_from_unverified_connection_does_not_skip_ca_check(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        good = certificate_fingerprint(cert.read_bytes())
        stream = await dial(port, f"fingerprint={good}")
        await stream.send([b"ping"])
        await stream.close()
        other, _ = certificate(tmp_path / "other")
        with pytest.raises(HandshakeError) as info:
            await dial(port, f"ca={other}&timeout=3")
        assert info.value.reason == "untrusted_certificate"


async def test_insecure_is_warned(tmp_path) -> None:
    async with serving(tmp_path) as (server, _cert):
        with pytest.warns(UserWarning, match="verification is disabled"):
            stream = await dial(server.listener.address.port, "insecure=1")
        await stream.close()


async def test_wrong_alpn(tmp_path) -> None:
    cert, key = certificate(tmp_path)
    configuration = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    configuration.load_cert_chain(cert, key)
    server = await serve("127.0.0.1", 0, configuration=configuration)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        started = time.monotonic()
        with pytest.raises(HandshakeError) as info:
            await dial(port, f"ca={cert}&timeout=3")
        assert info.value.reason == "alpn"
        assert time.monotonic() - started < 3
    finally:
        server.close()


async def test_no_server_fails_fast(tmp_path) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info:
        await dial(port, "insecure=0&timeout=3")
    assert not isinstance(info.value, HandshakeError)
    assert time.monotonic() - started < 3


async def test_silent_server_times_out(tmp_path) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match=r"no QUIC answer within 0\.5s"):
            await dial(silent.getsockname()[1], "timeout=0.5")
        assert time.monotonic() - started < 2
    finally:
        silent.close()


class _SpoiledAnswers(asyncio.DatagramProtocol):
    """A UDP forwarder that passes everything to the server, and its answers back spoiled
    (a byte of the first packet flipped, so it fails authentication): the client hears from
    the server but can never finish the handshake."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.answers = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.server:
            self.answers += 1
            if self.client is not None:
                spoiled = bytearray(data)
                spoiled[min(64, len(spoiled) - 1)] ^= 0xFF  # in the first packet's payload
                self.transport.sendto(bytes(spoiled), self.client)
        else:
            self.client = addr
            self.transport.sendto(data, self.server)


async def test_a_handshake_cut_short_says_the_server_answered(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        loop = asyncio.get_running_loop()
        forwarder, cut = await loop.create_datagram_endpoint(
            lambda: _SpoiledAnswers(("127.0.0.1", server.listener.address.port)),
            local_addr=("127.0.0.1", 0),
        )
        try:
            port = forwarder.get_extra_info("sockname")[1]
            with pytest.raises(ConnectFailed, match=r"the server answered, but the QUIC hands"):
                await dial(port, f"ca={cert}&sni=localhost&timeout=1")
            assert cut.answers >= 1
        finally:
            forwarder.close()


async def test_session_ticket_resumes(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        first = await dial(server.listener.address.port, f"ca={cert}")
        assert first.extra["session_resumed"] is False
        await first.send([b"ping"])
        _, sink = await server.first()
        await sink.wait_for(4)  # the ticket arrives with the first 1-RTT packets
        await first.close()
        second = await dial(server.listener.address.port, f"ca={cert}")
        assert second.extra["session_resumed"] is True
        await second.close()


async def test_stale_session_ticket_after_server_restart(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        first = await dial(port, f"ca={cert}")
        await first.send([b"ping"])
        _, sink = await server.first()
        await sink.wait_for(4)
        await first.close()
    # a new server on the same port knows nothing of the ticket the client holds
    again = await QuicTransport().listen(
        QuicTransport().parse(f"quic@127.0.0.1:{port}?cert={cert}&key={cert.with_name('key.pem')}"),
        lambda stream: None,
    )
    try:
        second = await dial(port, f"ca={cert}")
        assert second.extra["session_resumed"] is False
        await second.close()
    finally:
        await again.close()


async def test_garbage_datagrams_are_dropped(tmp_path) -> None:
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        client = await dial(port, f"ca={cert}")
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(300):
                size = (i * 37) % 1500 + 1
                junk.sendto(bytes((i + j) % 256 for j in range(size)), ("127.0.0.1", port))
            # a plausible long-header Initial with a random connection id, and a short header
            junk.sendto(
                b"\xc0\x00\x00\x00\x01\x08" + b"\x11" * 8 + b"\x00" + b"\x00" * 1300,
                ("127.0.0.1", port),
            )
            junk.sendto(b"\x40" + b"\x22" * 40, ("127.0.0.1", port))
        finally:
            junk.close()
        await client.send([b"still fine"])
        _, sink = await server.first()
        await sink.wait_for(10)
        assert bytes(sink.data) == b"still fine"
        assert server.listener.dropped > 0
        second = await dial(port, f"ca={cert}")
        await second.close()
        await client.close()


@pytest.mark.parametrize(
    ("bidirectional", "payload", "complaint"),
    [
        (False, b"\x07junk", "unknown QUIC stream kind 7"),
        (True, b"\x00hello", "bidirectional QUIC stream"),
        (False, b"\x01\x00", "empty unit on the ordered stream"),
    ],
)
async def test_peer_breaking_stream_rules_is_dropped(
    tmp_path, bidirectional, payload, complaint
) -> None:
    async with serving(tmp_path) as (server, cert):
        configuration = QuicConfiguration(is_client=True, alpn_protocols=["polyrpc/1"])
        configuration.load_verify_locations(cafile=str(cert))
        port = server.listener.address.port
        async with connect("127.0.0.1", port, configuration=configuration) as peer:
            quic = peer._quic
            stream_id = quic.get_next_available_stream_id(is_unidirectional=not bidirectional)
            quic.send_stream_data(stream_id, payload, True)
            peer.transmit()
            _, sink = await server.first()
            async with asyncio.timeout(5):
                await sink.lost.wait()
                await peer.wait_closed()
            assert complaint in str(sink.lost_exc)
            assert complaint in quic._close_event.reason_phrase
        # the listener is unharmed
        good = await dial(port, f"ca={cert}")
        await good.close()


def test_development_certificate(tmp_path) -> None:
    url, fingerprint = with_development_certificate("quic@127.0.0.1:0", tmp_path)
    assert "cert=" in url and "key=" in url
    assert fingerprint is not None and len(fingerprint.replace(":", "")) == 64
    same, none = with_development_certificate(url, tmp_path)
    assert same == url and none is None


async def test_ipv6_loopback(tmp_path) -> None:
    cert, key = certificate(tmp_path, ["localhost", "::1"])
    server = Server()
    transport = QuicTransport()
    listener = await transport.listen(
        transport.parse(f"quic@[::1]:0?cert={cert}&key={key}"), server.on_stream
    )
    try:
        client = await transport.dial(transport.parse(f"{listener.url}?ca={cert}"))
        assert client.extra["peer"] == ("::1", listener.address.port)
        await client.send([b"over v6"])
        _, sink = await server.first()
        await sink.wait_for(7)
        await client.close()
    finally:
        await listener.close()


async def test_a_refusing_address_falls_through_to_the_next(tmp_path, monkeypatch) -> None:
    # a name resolving to ::1 (nothing listens there) and then 127.0.0.1 (the server)
    async with serving(tmp_path) as (server, cert):
        port = server.listener.address.port
        loop = asyncio.get_running_loop()

        async def resolve(host, port, **kwargs):
            assert host == "twohomes.test"
            return [
                (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port)),
            ]

        monkeypatch.setattr(loop, "getaddrinfo", resolve)
        client = await dial(port, f"ca={cert}&sni=localhost", host="twohomes.test")
        assert client.extra["peer"] == ("127.0.0.1", port)
        await client.close()


def certificate_fingerprint_of(stream) -> str:
    """The SHA-256 fingerprint of the certificate a client stream shows as its peer's."""
    from cryptography.hazmat.primitives import serialization

    pem = stream.extra["peer_cert"].public_bytes(serialization.Encoding.PEM)
    return certificate_fingerprint(pem)
