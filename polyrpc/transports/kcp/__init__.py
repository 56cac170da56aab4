"""The ``kcp`` transport: KCP (reliable ARQ over UDP) with polyrpc's own C core via cffi.

``kcp@host:port?mode=fast&mtu=1400&sndwnd=512&rcvwnd=512&timeout=30``; see
docs/transports/kcp.md for the modes, the handshake and the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from pathlib import Path
from typing import Any

from ...errors import ConnectFailed, ConnectTimeout, InvalidAddress
from ...stream.address import Address
from ...stream.trait import Listener, StreamHandler
from ...stream.transport import Option, Transport, choice, integer, number
from .._shared import REUSE_PORT
from .._shared.udp import bind_udp
from . import engine

MODES: dict[str, tuple[int, int, int, int]] = {
    # mode: (nodelay, interval ms, fast-resend after N acks, no congestion window)
    "normal": (0, 40, 0, 0),
    "fast": (0, 30, 2, 1),
    "fast2": (1, 20, 2, 1),
    "fast3": (1, 10, 2, 1),
}
CONNECT_RETRY = 0.1
CONNECT_RETRY_MAX = 1.0
CONNECT_TIMEOUT_MAX = 10.0


class KcpListener(Listener):
    """A UDP socket accepting KCP sessions; established sessions outlive :meth:`close`."""

    def __init__(self, address: Address, mux: Any) -> None:
        super().__init__(address)
        self.mux = mux
        self.accepting = True
        self.handshaking = 0
        """Accepted connections that have sent no data yet (capped by ``backlog``)."""

    def left_handshake(self) -> None:
        """An accepted connection sent its first bytes, or ended before that."""
        self.handshaking -= 1

    def stats(self) -> dict[str, int]:
        """Socket-level counters (datagrams, drops by reason, sessions)."""
        return self.mux.stats() if not self.mux.closed else {}

    async def close(self) -> None:
        self.accepting = False
        self.mux.keep_open = False
        if not self.mux.streams:
            self.mux.close()


class KcpTransport(Transport):
    """KCP over UDP with a polyrpc handshake and close; the protocol engine is C (cffi)."""

    scheme = "kcp"
    description = "KCP over UDP (own C core via cffi; modes normal/fast/fast2/fast3)"
    options = {
        "mode": Option(
            choice(*MODES), "KCP preset: normal, fast, fast2 or fast3 (lowest latency)", "fast"
        ),
        "mtu": Option(integer(100, 9000), "largest datagram KCP sends, bytes", 1400),
        "reuse_port": REUSE_PORT,
        "sndwnd": Option(integer(1, 65535), "send window, segments", 512),
        "rcvwnd": Option(integer(1, 65535), "receive window, segments", 512),
        "timeout": Option(
            number(0.5, 86400), "seconds of peer silence before the connection is lost", 10.0
        ),
        "keepalive": Option(
            number(0.1, 3600),
            "seconds of our silence before a keepalive (at most timeout/4); a dead peer "
            "process answers it with ICMP port unreachable, which ends the connection",
            1.0,
        ),
        "backlog": Option(
            integer(1, 1 << 20),
            "listener: connections accepted but still silent (no data yet); more are refused",
            512,
        ),
    }

    def unavailable_reason(self) -> str | None:
        return engine.unavailable_reason()

    def _config(self, address: Address) -> Any:
        from .udp import KcpConfig

        opts = self.parse_options(address)
        nodelay, interval, resend, nocwnd = MODES[opts["mode"]]
        return KcpConfig(
            mode=opts["mode"],
            nodelay=nodelay,
            interval=interval,
            resend=resend,
            nocwnd=nocwnd,
            mtu=opts["mtu"],
            sndwnd=opts["sndwnd"],
            rcvwnd=opts["rcvwnd"],
            timeout=opts["timeout"],
            keepalive=opts["keepalive"],
            backlog=opts["backlog"],
        )

    async def dial(self, address: Address) -> Any:
        self.check_available()
        config = self._config(address)
        if address.port == 0:
            raise InvalidAddress(f"cannot dial port 0 in {address}: port 0 is only for listening")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectFailed(f"could not resolve {address.host!r}: {exc}") from exc
        error: ConnectFailed | None = None
        for family, _, _, _, sockaddr in dict.fromkeys(infos):  # like TCP: each address in turn
            try:
                return await self._dial_one(family, sockaddr, config)
            except ConnectTimeout as exc:
                raise ConnectTimeout(f"could not connect to {address}: {exc}") from None
            except ConnectFailed as exc:
                error = exc
        assert error is not None
        raise ConnectFailed(f"could not connect to {address}: {error}") from None

    async def _dial_one(self, family: int, sockaddr: Any, config: Any) -> Any:
        """Handshake with one resolved address; ConnectFailed/ConnectTimeout if it fails."""
        from .udp import KcpStream, Mux, make_socket, pack_address

        loop = asyncio.get_running_loop()
        sock = make_socket(family)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        mux = Mux(sock, connected=True)
        peer = pack_address(sockaddr[0], sockaddr[1])
        conv = random.getrandbits(32) or 1
        sid = mux.open_session(peer, conv, config)
        stream = KcpStream(mux, sid, conv, peer, config, established=False)
        mux.hint = stream
        connected = stream._connected
        assert connected is not None
        limit = min(config.timeout, CONNECT_TIMEOUT_MAX)
        delay = CONNECT_RETRY
        deadline = loop.time() + limit
        try:
            while not connected.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ConnectTimeout(f"no kcp answer within {limit:g}s")
                stream.send_syn()  # the listener's COOKIE answer makes the stream resend at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(connected), min(delay, remaining))
                delay = min(delay * 2, CONNECT_RETRY_MAX)
            connected.result()
        except BaseException:
            stream.abort()
            raise
        return stream

    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        from .udp import BUSY, MAGIC, RST, SYNACK, KcpStream, Mux, make_socket

        self.check_available()
        config = self._config(address)
        sock = await bind_udp(
            address, make_socket, reuse_port=self.parse_options(address)["reuse_port"]
        )
        listener: KcpListener | None = None

        def accept(conv: int, addr: bytes, sn: int, una: int) -> None:
            # reached only by a SYN that echoed a valid cookie: the address is not spoofed
            if listener is None or not listener.accepting:
                mux.control(addr, conv, RST)
                return
            if listener.handshaking >= config.backlog:
                mux.control(addr, conv, RST, BUSY)
                return
            sid = mux.open_session(addr, conv, config)
            stream = KcpStream(mux, sid, conv, addr, config, established=True)
            listener.handshaking += 1
            stream.on_first_data = listener.left_handshake
            mux.control(addr, conv, SYNACK, 0, 0, MAGIC)
            on_stream(stream)

        mux = Mux(sock, acceptor=accept)
        listener = KcpListener(address.with_port(sock.getsockname()[1]), mux)
        return listener

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        return "kcp@127.0.0.1:0?mode=fast3", {"mode": "fast3"}
