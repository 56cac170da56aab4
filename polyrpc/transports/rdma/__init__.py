"""The ``rdma`` transport: Reliable Connected QPs through pyverbs, set up with rdma_cm.

``rdma@host:port?dev=rxe0&port=1&gid_index=1&bufsize=65536&depth=32``; ``host``
is the IP address of an RDMA-capable interface (RoCE, soft-RoCE, IB with IPoIB).
See docs/transports/rdma.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ...errors import ConnectFailed, InvalidAddress, TransportUnavailable
from ...stream.address import Address
from ...stream.trait import Listener, StreamHandler
from ...stream.transport import Option, Transport, integer, number, text
from .engine import MAX_BUFSIZE, MAX_DEPTH, MIN_BUFSIZE, MIN_DEPTH, PeerInfo

ATTEMPT_SECONDS = 4.0
"""How long the first rdma_cm connection attempt may stay silent before a fresh one is made
(each further attempt waits twice as long); the caller's connect timeout bounds them all."""
SYSFS = Path("/sys/class/infiniband")
BACKLOG = 128
REJECT_TAG = b"polyrpc:"
"""Starts the reason a listener puts in a reject (the rest is its error message)."""


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"expected a numeric IP address, got {value!r}") from None


def _power_of_two(value: str) -> int:
    size = integer(MIN_BUFSIZE, MAX_BUFSIZE)(value)
    if size & (size - 1):
        raise ValueError(f"{size} is not a power of two")
    return size


def rdma_interfaces() -> list[tuple[str, int, str]]:
    """(device, port, IP) for every IP address that has a GID on an RDMA port here."""
    found: list[tuple[str, int, str]] = []
    if not SYSFS.is_dir():
        return found
    for dev in sorted(SYSFS.iterdir()):
        for port_dir in sorted((dev / "ports").iterdir()):
            seen: set[str] = set()
            for entry in (port_dir / "gids").iterdir():
                try:
                    raw = bytes.fromhex(entry.read_text().strip().replace(":", ""))
                except (OSError, ValueError):
                    continue
                if len(raw) != 16 or not any(raw) or raw[:2] == b"\xfe\x80":
                    continue
                ip = ipaddress.IPv6Address(raw)
                addr = str(ip.ipv4_mapped or ip)
                if addr not in seen:
                    seen.add(addr)
                    found.append((dev.name, int(port_dir.name), addr))
    return found


def _describe_interfaces() -> str:
    rows = rdma_interfaces()
    if not rows:
        return "this machine has no RDMA interface with an IP address"
    return "RDMA addresses here: " + ", ".join(f"{ip} ({dev} port {p})" for dev, p, ip in rows)


_pyverbs_error: str | None = None
_pyverbs_checked = False


def _pyverbs_problem() -> str | None:
    global _pyverbs_error, _pyverbs_checked
    if not _pyverbs_checked:
        _pyverbs_checked = True
        try:
            import pyverbs.device  # noqa: F401

            from . import cm

            cm.lib()
        except ImportError as exc:
            _pyverbs_error = (
                f"pyverbs is not importable by this Python ({sys.executable}, "
                f"{sys.version.split()[0]}): {exc}. Fix: install your distribution's pyverbs "
                "(Debian/Ubuntu: apt-get install python3-pyverbs rdma-core ibverbs-providers) "
                "and run polyrpc with that system Python (/usr/bin/python3); PyPI's pyverbs only "
                "works with the exact rdma-core version it was built for"
            )
        except OSError as exc:
            _pyverbs_error = (
                f"librdmacm/libibverbs could not be loaded ({exc}); "
                "fix: apt-get install librdmacm1 libibverbs1 ibverbs-providers"
            )
    return _pyverbs_error


def _device_problem() -> str | None:
    devices = sorted(p.name for p in SYSFS.iterdir()) if SYSFS.is_dir() else []
    if devices:
        return None
    return (
        "no RDMA device here (/sys/class/infiniband is empty or missing). Fix: on a kernel "
        "with RDMA support, create a soft-RoCE device (modprobe rdma_rxe; rdma link add rxe0 "
        "type rxe netdev eth0); on a kernel without it (CONFIG_INFINIBAND unset), run the RDMA "
        "tests in the project's soft-RoCE VM: vm/rdma-vm.sh test"
    )


class RdmaListener(Listener):
    """Accepts rdma_cm connection requests on one IP:port."""

    def __init__(self, address: Address, transport: RdmaTransport, opts: dict[str, Any]):
        super().__init__(address)
        self._transport = transport
        self._opts = opts
        self._channel: Any = None  # cm.Channel once started (cm loads lazily)
        self._id: Any = None  # its listening cm.CmId

    def start(self, on_stream: StreamHandler) -> None:
        from . import cm

        self._on_stream = on_stream
        self._channel = cm.Channel(asyncio.get_running_loop())
        try:
            self._id = self._channel.create_id(self._on_event)
            host = self.address.host
            try:
                self._id.bind(host, self.address.port)
            except cm.CmError as exc:
                if exc.errno in (19, 99):  # ENODEV, EADDRNOTAVAIL
                    raise TransportUnavailable(
                        f"rdma: {host} is not the address of an RDMA interface "
                        f"({exc.strerror}); {_describe_interfaces()}"
                    ) from None
                raise ConnectFailed(f"could not listen on {self.address}: {exc.strerror}") from exc
            self._id.listen(BACKLOG)
        except BaseException:
            self._teardown()
            raise
        dev = self._id.device_name
        if not dev and not ipaddress.ip_address(host).is_unspecified:
            self._teardown()
            raise TransportUnavailable(
                f"rdma: {host} is not the address of an RDMA interface (no RDMA device has it); "
                f"{_describe_interfaces()}"
            )
        if self._opts["dev"] and dev and dev != self._opts["dev"]:
            self._teardown()
            raise InvalidAddress(
                f"{self.address}: {host} is on RDMA device {dev}, not {self._opts['dev']}"
            )
        self.address = self.address.with_port(self._id.local[1])

    def _on_event(self, event) -> None:
        from . import cm

        if event.kind == cm.CONNECT_REQUEST:
            self._transport._accept(self._channel, event, self._opts, self._on_stream)

    def _teardown(self) -> None:
        if self._id is not None:
            self._id.destroy()
            self._id = None
        if self._channel is not None:
            self._channel.release()
            self._channel = None

    async def close(self) -> None:
        self._teardown()


class RdmaTransport(Transport):
    """RDMA (RoCE / soft-RoCE / InfiniBand) with pyverbs and rdma_cm."""

    scheme = "rdma"
    description = "RDMA RC QPs (pyverbs + rdma_cm), SEND/RECV with credits"
    options = {
        "dev": Option(text, "RDMA device the address must be on, e.g. rxe0 (checked)"),
        "port": Option(integer(1, 255), "device port number", 1),
        "gid_index": Option(
            integer(0, 4095), "GID table index to send from (default: RoCE v2 GID of the IP)"
        ),
        "bufsize": Option(
            _power_of_two, "bytes per receive buffer = largest RDMA message (power of two)", 65536
        ),
        "depth": Option(
            integer(MIN_DEPTH, MAX_DEPTH), "receive buffers posted = send credits of the peer", 32
        ),
        "spin": Option(
            integer(0, 1_000_000),
            "microseconds to poll for the answer after a send before sleeping (0: never)",
            1000,
        ),
        "src": Option(_ip, "dial: local IP to connect from (selects the local device)"),
        "timeout": Option(number(0.1, 600), "dial: seconds to wait for the connection", 60.0),
    }

    def unavailable_reason(self) -> str | None:
        problems = [p for p in (_device_problem(), _pyverbs_problem()) if p]
        return "; ".join(problems) if problems else None

    async def _numeric_host(self, address: Address) -> str:
        try:
            return str(ipaddress.ip_address(address.host))
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(address.host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectFailed(f"could not resolve {address.host!r}: {exc}") from exc
        return str(infos[0][4][0])

    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        self.check_available()
        opts = self.parse_options(address)
        host = await self._numeric_host(address)
        _refuse_loopback(host)
        listener = RdmaListener(dataclasses.replace(address, host=host), self, opts)
        listener.start(on_stream)
        return listener

    async def dial(self, address: Address):
        from . import cm
        from .stream import RdmaStream

        self.check_available()
        opts = self.parse_options(address)
        if address.port == 0:
            raise InvalidAddress(
                f"cannot dial port 0 in {address}: port 0 only works for listening"
            )
        host = await self._numeric_host(address)
        _refuse_loopback(host)
        loop = asyncio.get_running_loop()
        channel = cm.Channel(loop)
        where = f"{host}:{address.port}"
        deadline = loop.time() + opts["timeout"]
        attempt_seconds = ATTEMPT_SECONDS
        try:
            while True:
                # rdma_cm's own messages can be lost (soft-RoCE under load shows it): an
                # attempt that hears nothing for ATTEMPT_SECONDS is abandoned (the peer sees
                # it rejected and frees its side) and a fresh one starts, until the timeout.
                attempt = min(attempt_seconds, deadline - loop.time())
                attempt_seconds *= 2  # a slow peer (not a lost message) gets more time
                try:
                    cm_id, res, peer = await self._dial_once(
                        channel, host, address, opts, where, attempt
                    )
                    break
                except TimeoutError:
                    if loop.time() + 0.05 >= deadline:
                        raise ConnectFailed(
                            f"could not connect to {where}: no answer within {opts['timeout']} s"
                        ) from None
        finally:
            channel.release()  # the ids made here keep the channel alive as long as they live
        # the loop ends only by the break after _dial_once bound them (or by raising)
        extra = _extra(cm_id, res, peer)  # type: ignore[possibly-undefined]
        stream = RdmaStream(cm_id, res, peer, extra, opts["spin"] / 1e6)
        channel.route(cm_id.ptr, stream.on_cm_event)
        return stream

    async def _dial_once(
        self, channel, host: str, address: Address, opts: dict[str, Any], where: str, seconds: float
    ):
        """One rdma_cm connection attempt; TimeoutError if it hears nothing in ``seconds``."""
        from . import cm
        from .verbs import Resources

        events: asyncio.Queue = asyncio.Queue()
        cm_id = channel.create_id(events.put_nowait)
        res = None

        async def expect(kind: int):
            event = await events.get()
            if event.kind != kind:
                raise _dial_error(event, where, opts)
            return event

        try:
            async with asyncio.timeout(seconds):
                try:
                    cm_id.resolve_addr(opts["src"], host, address.port, 2000)
                except cm.CmError as exc:
                    raise TransportUnavailable(
                        f"rdma: cannot send from {opts['src'] or 'the default route'} to {host} "
                        f"over RDMA ({exc.strerror}); {_describe_interfaces()}"
                    ) from None
                await expect(cm.ADDR_RESOLVED)
                dev = cm_id.device_name
                if opts["dev"] and dev != opts["dev"]:
                    raise InvalidAddress(
                        f"{address}: the route to {host} uses RDMA device {dev}, not {opts['dev']}"
                    )
                cm_id.resolve_route(2000)
                await expect(cm.ROUTE_RESOLVED)
                res = Resources(dev, opts["port"], opts["depth"], opts["bufsize"])
                res.to_init()
                sgid, gid = _local_gid(dev, opts["port"], cm_id.local[0], opts["gid_index"])
                param, keep = cm.make_conn_param(res.info(gid).pack(), res.qpn)
                cm_id.connect(param)
                event = await expect(cm.CONNECT_RESPONSE)
                del keep
                try:
                    peer = PeerInfo.unpack(event.private_data)
                except ValueError as exc:
                    raise ConnectFailed(f"could not connect to {where}: {exc}") from None
                res.connect_qp(peer, sgid)
                cm_id.establish()
        except BaseException as exc:
            if res is not None:
                res.close()
            cm_id.destroy()
            if isinstance(exc, cm.CmError):
                raise ConnectFailed(f"could not connect to {where}: {exc.strerror}") from exc
            raise
        return cm_id, res, peer

    def _accept(self, channel, event, opts: dict[str, Any], on_stream: StreamHandler) -> None:
        """Answer one connection request: build the QP towards the peer, accept, wait for RTU."""
        from . import cm
        from .stream import RdmaStream
        from .verbs import Resources

        cm_id = channel.adopt(event.id, lambda ev: None)
        res = None
        try:
            peer = PeerInfo.unpack(event.private_data)
            dev = cm_id.device_name
            res = Resources(dev, opts["port"], opts["depth"], opts["bufsize"])
            res.to_init()
            sgid, gid = _local_gid(dev, opts["port"], cm_id.local[0], opts["gid_index"])
            res.connect_qp(peer, sgid)
            param, keep = cm.make_conn_param(res.info(gid).pack(), res.qpn)
            cm_id.accept(param)
            del keep
        except Exception as exc:
            # the dialer hears why (a reject carries up to 148 bytes): a refusal for a reason
            # of this side's, such as the locked-memory limit, is not a mystery over there
            cm_id.reject(REJECT_TAG + str(exc).encode()[: cm.REJECT_DATA_MAX - len(REJECT_TAG)])
            if res is not None:
                res.close()
            cm_id.destroy()
            return
        stream = RdmaStream(cm_id, res, peer, _extra(cm_id, res, peer), opts["spin"] / 1e6)

        def established() -> None:
            """Hand the stream over once: on ESTABLISHED, or on the first message, which
            proves the peer's QP is ready even if its RTU is lost or late (IB's COMM_EST)."""
            if stream.on_first_message is None:
                return
            stream.on_first_message = None
            channel.route(event.id, stream.on_cm_event)
            on_stream(stream)

        def until_established(ev) -> None:
            if ev.kind == cm.ESTABLISHED:
                established()
            elif ev.kind in (cm.REJECTED, cm.CONNECT_ERROR, cm.UNREACHABLE, cm.DISCONNECTED):
                stream.abort()

        stream.on_first_message = established
        channel.route(event.id, until_established)

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        """Listen on $POLYRPC_RDMA_LISTEN (else the first RDMA address); dial from
        $POLYRPC_RDMA_DIAL_SRC (else the same address: one device)."""
        interfaces = rdma_interfaces()
        by_ip = {ip: dev for dev, _, ip in interfaces}
        listen_ip = os.environ.get("POLYRPC_RDMA_LISTEN") or (
            interfaces[0][2] if interfaces else "127.0.0.1"
        )
        src = os.environ.get("POLYRPC_RDMA_DIAL_SRC") or listen_ip
        listen = f"rdma@{listen_ip}:0"
        client: dict[str, str] = {}
        if listen_ip in by_ip:
            listen += f"?dev={by_ip[listen_ip]}"
        if src != listen_ip:
            client["src"] = src
        if src in by_ip:
            client["dev"] = by_ip[src]
        return listen, client


def _refuse_loopback(host: str) -> None:
    if ipaddress.ip_address(host).is_loopback:
        raise TransportUnavailable(
            f"rdma: {host} is not the address of an RDMA interface (RDMA does not run over the "
            f"loopback device; use the IP of the RDMA interface itself); {_describe_interfaces()}"
        )


def _local_gid(dev: str, port: int, local_ip: str, gid_index: int | None) -> tuple[int, bytes]:
    from .verbs import find_gid_index

    index = gid_index if gid_index is not None else find_gid_index(dev, port, local_ip)
    path = SYSFS / dev / "ports" / str(port) / "gids" / str(index)
    try:
        gid = bytes.fromhex(path.read_text().strip().replace(":", ""))
    except OSError as exc:
        raise InvalidAddress(f"{dev} port {port} has no GID index {index} ({exc})") from None
    if not any(gid):
        raise InvalidAddress(f"{dev} port {port} GID index {index} is empty")
    return index, gid


def _extra(cm_id, res, peer) -> dict[str, Any]:
    return {
        "peer": cm_id.peer,
        "local": cm_id.local,
        "device": res.device,
        "port": res.port,
        "bufsize": min(res.bufsize, peer.bufsize),
        "depth": res.depth,
        "mtu": 128 << min(res.port_attr.active_mtu, peer.mtu),
    }


def _dial_error(event, where: str, opts: dict[str, Any]) -> Exception:
    from . import cm

    if event.kind == cm.REJECTED:
        if event.status == cm.REJECT_INVALID_SERVICE_ID:
            return ConnectFailed(
                f"could not connect to {where}: connection refused (is a server listening there?)"
            )
        reason = event.private_data
        if reason.startswith(REJECT_TAG):
            why = reason[len(REJECT_TAG) :].rstrip(b"\0").decode(errors="replace")
            return ConnectFailed(f"could not connect to {where}: the listener refused: {why}")
        return ConnectFailed(f"could not connect to {where}: rejected by the peer")
    if event.kind == cm.ADDR_ERROR:
        if event.status in (-19, -99):
            return TransportUnavailable(
                f"rdma: {where} cannot be reached through an RDMA interface from "
                f"{opts['src'] or 'the default route'}; {_describe_interfaces()}"
            )
        return ConnectFailed(
            f"could not connect to {where}: address resolution failed "
            f"({os.strerror(-event.status) if event.status < 0 else event.status})"
        )
    if event.kind == cm.UNREACHABLE:
        return ConnectFailed(f"could not connect to {where}: unreachable (no RDMA peer answered)")
    detail = os.strerror(-event.status) if event.status < 0 else str(event.status)
    return ConnectFailed(f"could not connect to {where}: {event.name} ({detail})")
