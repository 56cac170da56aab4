"""Asynchronous rdma_cm (librdmacm) through ctypes, driven by the asyncio loop.

pyverbs wraps rdma_cm too, but its synchronous calls block while holding the GIL
(freezing the event loop and any peer in the same process), its event channel
exposes no file descriptor, and its events do not say which connection they are
for. So connection management talks to librdmacm directly: every call here is
non-blocking (asynchronous rdma_cm), events are read only when the channel's fd
is readable, and each event is routed to its rdma_cm_id. The verbs objects
(device context, PD, CQ, QP, MRs) are pyverbs objects owned by the stream.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

RDMA_PS_TCP = 0x0106

ADDR_RESOLVED = 0
ADDR_ERROR = 1
ROUTE_RESOLVED = 2
ROUTE_ERROR = 3
CONNECT_REQUEST = 4
CONNECT_RESPONSE = 5
CONNECT_ERROR = 6
UNREACHABLE = 7
REJECTED = 8
ESTABLISHED = 9
DISCONNECTED = 10
DEVICE_REMOVAL = 11
ADDR_CHANGE = 14
TIMEWAIT_EXIT = 15

EVENT_NAMES = {
    ADDR_RESOLVED: "ADDR_RESOLVED",
    ADDR_ERROR: "ADDR_ERROR",
    ROUTE_RESOLVED: "ROUTE_RESOLVED",
    ROUTE_ERROR: "ROUTE_ERROR",
    CONNECT_REQUEST: "CONNECT_REQUEST",
    CONNECT_RESPONSE: "CONNECT_RESPONSE",
    CONNECT_ERROR: "CONNECT_ERROR",
    UNREACHABLE: "UNREACHABLE",
    REJECTED: "REJECTED",
    ESTABLISHED: "ESTABLISHED",
    DISCONNECTED: "DISCONNECTED",
    DEVICE_REMOVAL: "DEVICE_REMOVAL",
    ADDR_CHANGE: "ADDR_CHANGE",
    TIMEWAIT_EXIT: "TIMEWAIT_EXIT",
}

REJECT_INVALID_SERVICE_ID = 8
"""IB CM reject reason when nothing listens on the port (the "connection refused" of RDMA)."""
REJECT_CONSUMER = 28
"""IB CM reject reason when the listening application rejected the request."""
REJECT_DATA_MAX = 148
"""Private data bytes an IB CM reject can carry (IB_CM_REJ_PRIVATE_DATA_SIZE)."""

# struct rdma_cm_id: verbs, channel, context, qp pointers, then route.addr.{src,dst}_addr
# (each a union padded to sockaddr_storage).
_SRC_ADDR_OFFSET = 4 * ctypes.sizeof(ctypes.c_void_p)
_DST_ADDR_OFFSET = _SRC_ADDR_OFFSET + 128


class ConnParam(ctypes.Structure):
    """struct rdma_conn_param."""

    _fields_ = (
        ("private_data", ctypes.c_void_p),
        ("private_data_len", ctypes.c_uint8),
        ("responder_resources", ctypes.c_uint8),
        ("initiator_depth", ctypes.c_uint8),
        ("flow_control", ctypes.c_uint8),
        ("retry_count", ctypes.c_uint8),
        ("rnr_retry_count", ctypes.c_uint8),
        ("srq", ctypes.c_uint8),
        ("qp_num", ctypes.c_uint32),
    )


class _UdParam(ctypes.Structure):
    _fields_ = (
        ("private_data", ctypes.c_void_p),
        ("private_data_len", ctypes.c_uint8),
        ("ah_attr", ctypes.c_uint8 * 32),
        ("qp_num", ctypes.c_uint32),
        ("qkey", ctypes.c_uint32),
    )


class _Param(ctypes.Union):
    _fields_ = (("conn", ConnParam), ("ud", _UdParam))


class _CmEvent(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_void_p),
        ("listen_id", ctypes.c_void_p),
        ("event", ctypes.c_int),
        ("status", ctypes.c_int),
        ("param", _Param),
    )


class _EventChannel(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_int),)


@dataclass
class Event:
    """A copied rdma_cm event (the C event is acknowledged at once)."""

    kind: int
    status: int
    id: int
    listen_id: int
    private_data: bytes
    qp_num: int

    @property
    def name(self) -> str:
        return EVENT_NAMES.get(self.kind, str(self.kind))


class _Lib:
    """The librdmacm and libibverbs functions used here, with their C signatures."""

    def __init__(self) -> None:
        cm = ctypes.CDLL(ctypes.util.find_library("rdmacm") or "librdmacm.so.1", use_errno=True)
        verbs = ctypes.CDLL(
            ctypes.util.find_library("ibverbs") or "libibverbs.so.1", use_errno=True
        )
        vp, vpp, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int
        self.create_event_channel = _fn(cm.rdma_create_event_channel, vp, [])
        self.destroy_event_channel = _fn(cm.rdma_destroy_event_channel, None, [vp])
        self.create_id = _fn(cm.rdma_create_id, i, [vp, vpp, vp, i])
        self.destroy_id = _fn(cm.rdma_destroy_id, i, [vp])
        self.bind_addr = _fn(cm.rdma_bind_addr, i, [vp, ctypes.c_char_p])
        self.resolve_addr = _fn(cm.rdma_resolve_addr, i, [vp, ctypes.c_char_p, ctypes.c_char_p, i])
        self.resolve_route = _fn(cm.rdma_resolve_route, i, [vp, i])
        self.listen = _fn(cm.rdma_listen, i, [vp, i])
        self.connect = _fn(cm.rdma_connect, i, [vp, ctypes.POINTER(ConnParam)])
        self.accept = _fn(cm.rdma_accept, i, [vp, ctypes.POINTER(ConnParam)])
        self.reject = _fn(cm.rdma_reject, i, [vp, vp, ctypes.c_uint8])
        self.establish = _fn(cm.rdma_establish, i, [vp])
        self.disconnect = _fn(cm.rdma_disconnect, i, [vp])
        self.get_cm_event = _fn(cm.rdma_get_cm_event, i, [vp, ctypes.POINTER(ctypes.c_void_p)])
        self.ack_cm_event = _fn(cm.rdma_ack_cm_event, i, [vp])
        self.get_device_name = _fn(verbs.ibv_get_device_name, ctypes.c_char_p, [vp])


def _fn(f, restype, argtypes):
    f.restype = restype
    f.argtypes = argtypes
    return f


_lib: _Lib | None = None


def lib() -> _Lib:
    """Load librdmacm/libibverbs once (raises OSError if they are missing)."""
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


class CmError(OSError):
    """A failed rdma_cm call, with errno."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno() or errno.EIO
        raise CmError(err, f"{what}: {os.strerror(err)}")


def sockaddr(host: str, port: int) -> bytes:
    """A struct sockaddr_in/sockaddr_in6 for a numeric IP address."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, ip.packed)
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI16sI", port, 0, ip.packed, 0)


def _read_sockaddr(address: int) -> tuple[str, int]:
    family = ctypes.c_uint16.from_address(address).value
    raw = ctypes.string_at(address + 2, 26)
    if family == socket.AF_INET:
        port, packed = struct.unpack_from("!H4s", raw)
        return str(ipaddress.IPv4Address(packed)), port
    if family == socket.AF_INET6:
        port, _, packed = struct.unpack_from("!HI16s", raw)
        return str(ipaddress.IPv6Address(packed)), port
    return "", 0


class Channel:
    """An rdma_cm event channel watched by the loop; events are routed by rdma_cm_id."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ptr = lib().create_event_channel()
        if not self._ptr:
            err = ctypes.get_errno() or errno.ENODEV
            raise CmError(err, f"rdma_create_event_channel: {os.strerror(err)}")
        self.fd = _EventChannel.from_address(self._ptr).fd
        os.set_blocking(self.fd, False)
        self._handlers: dict[int, Callable[[Event], None]] = {}
        self._owners = 1
        loop.add_reader(self.fd, self._on_readable)

    def create_id(self, handler: Callable[[Event], None]) -> CmId:
        """A new rdma_cm_id on this channel whose events go to ``handler``."""
        out = ctypes.c_void_p()
        _check(lib().create_id(self._ptr, ctypes.byref(out), None, RDMA_PS_TCP), "rdma_create_id")
        return self.adopt(cast(int, out.value), handler)  # set: _check raised otherwise

    def adopt(self, ptr: int, handler: Callable[[Event], None]) -> CmId:
        """Wrap an rdma_cm_id created by a connect request on this channel."""
        self._handlers[ptr] = handler
        self._owners += 1
        return CmId(self, ptr)

    def route(self, ptr: int, handler: Callable[[Event], None]) -> None:
        """Send the events of ``ptr`` to ``handler`` from now on."""
        self._handlers[ptr] = handler

    def _on_readable(self) -> None:
        lib_ = lib()
        while self._ptr:
            raw = ctypes.c_void_p()
            if lib_.get_cm_event(self._ptr, ctypes.byref(raw)) != 0:
                return  # EAGAIN: drained
            c = _CmEvent.from_address(cast(int, raw.value))  # set: the call succeeded
            conn = c.param.conn
            private = b""
            with_data = c.event in (CONNECT_REQUEST, CONNECT_RESPONSE, ESTABLISHED, REJECTED)
            if with_data and conn.private_data and conn.private_data_len:
                private = ctypes.string_at(conn.private_data, conn.private_data_len)
            event = Event(c.event, c.status, c.id or 0, c.listen_id or 0, private, conn.qp_num)
            lib_.ack_cm_event(raw)
            target = event.listen_id if event.kind == CONNECT_REQUEST else event.id
            handler = self._handlers.get(target)
            if handler is not None:
                handler(event)
            elif event.kind == CONNECT_REQUEST:
                lib_.reject(event.id, None, 0)
                lib_.destroy_id(event.id)

    def _forget(self, ptr: int) -> None:
        self._handlers.pop(ptr, None)
        self.release()

    def release(self) -> None:
        """Drop one owner; the channel is destroyed when no id and no owner is left."""
        self._owners -= 1
        if self._owners == 0 and self._ptr:
            self._loop.remove_reader(self.fd)
            lib().destroy_event_channel(self._ptr)
            self._ptr = None


class CmId:
    """One rdma_cm_id. All calls are asynchronous: results arrive as events."""

    def __init__(self, channel: Channel, ptr: int) -> None:
        self.channel = channel
        self.ptr: Any = ptr  # the address; None once destroyed

    def bind(self, host: str, port: int) -> None:
        _check(lib().bind_addr(self.ptr, sockaddr(host, port)), f"rdma_bind_addr({host}:{port})")

    def listen(self, backlog: int) -> None:
        _check(lib().listen(self.ptr, backlog), "rdma_listen")

    def resolve_addr(self, src: str | None, dst: str, port: int, timeout_ms: int) -> None:
        src_sa = sockaddr(src, 0) if src else None
        _check(
            lib().resolve_addr(self.ptr, src_sa, sockaddr(dst, port), timeout_ms),
            f"rdma_resolve_addr({dst}:{port})",
        )

    def resolve_route(self, timeout_ms: int) -> None:
        _check(lib().resolve_route(self.ptr, timeout_ms), "rdma_resolve_route")

    def connect(self, param: ConnParam) -> None:
        _check(lib().connect(self.ptr, ctypes.byref(param)), "rdma_connect")

    def accept(self, param: ConnParam) -> None:
        _check(lib().accept(self.ptr, ctypes.byref(param)), "rdma_accept")

    def reject(self, private: bytes = b"") -> None:
        """Refuse a connection request; ``private`` (at most 148 bytes) reaches the dialer."""
        size = min(len(private), REJECT_DATA_MAX)
        data = ctypes.create_string_buffer(private[:size], size) if size else None
        lib().reject(self.ptr, data, size)

    def establish(self) -> None:
        _check(lib().establish(self.ptr), "rdma_establish")

    def disconnect(self) -> None:
        """Send a disconnect request (DREQ); harmless if already disconnected."""
        if self.ptr:
            lib().disconnect(self.ptr)

    @property
    def device_name(self) -> str:
        """The RDMA device this id is bound to (after address resolution or a request)."""
        verbs = ctypes.c_void_p.from_address(self.ptr).value
        if not verbs:
            return ""
        device = ctypes.c_void_p.from_address(verbs).value
        return lib().get_device_name(device).decode()

    @property
    def local(self) -> tuple[str, int]:
        return _read_sockaddr(self.ptr + _SRC_ADDR_OFFSET)

    @property
    def peer(self) -> tuple[str, int]:
        return _read_sockaddr(self.ptr + _DST_ADDR_OFFSET)

    def destroy(self) -> None:
        """Destroy the id (a connected one sends a disconnect request to the peer)."""
        ptr, self.ptr = self.ptr, None
        if ptr:
            lib().destroy_id(ptr)
            self.channel._forget(ptr)


def make_conn_param(private: bytes, qp_num: int) -> tuple[ConnParam, ctypes.Array]:
    """A connection parameter block carrying ``private`` (kept alive by the returned buffer)."""
    buf = ctypes.create_string_buffer(private, len(private))
    param = ConnParam()
    param.private_data = ctypes.cast(buf, ctypes.c_void_p)
    param.private_data_len = len(private)
    param.responder_resources = 1
    param.initiator_depth = 1
    param.retry_count = 7
    param.rnr_retry_count = 7
    param.qp_num = qp_num
    return param, buf
