"""Verbs resources of one RDMA connection (pyverbs): context, PD, CQ + completion channel, QP, MRs.

Everything a connection registers with the device lives here and is released by
:meth:`Resources.close` in dependency order, so nothing grows across connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import resource
from pathlib import Path

import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ, CompChannel
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsRDMAError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR

from ...errors import TransportUnavailable
from .engine import HS_BUFSIZE, HS_DEPTH, PeerInfo

SYSFS = Path("/sys/class/infiniband")


def gid_text(gid: bytes) -> str:
    """The colon form pyverbs and sysfs use for a GID."""
    return ":".join(gid[i : i + 2].hex() for i in range(0, 16, 2))


def find_gid_index(device: str, port: int, local_ip: str) -> int:
    """The port's RoCE v2 GID index for ``local_ip`` (how rdma_cm itself would address it)."""
    import ipaddress

    ip = ipaddress.ip_address(local_ip)
    want = (ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed).hex()
    base = SYSFS / device / "ports" / str(port)
    fallback = -1
    for entry in sorted((base / "gids").iterdir(), key=lambda p: int(p.name)):
        try:
            if entry.read_text().strip().replace(":", "") != want:
                continue
            kind = (base / "gid_attrs" / "types" / entry.name).read_text().strip()
        except OSError:
            continue
        if kind.lower() == "roce v2":
            return int(entry.name)
        fallback = int(entry.name)
    if fallback >= 0:
        return fallback
    raise LookupError(f"{device} port {port} has no GID for {local_ip}")


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _comp_channel(ctx: Context) -> tuple[CompChannel, int]:
    """A completion channel and its file descriptor.

    This pyverbs version does not expose the channel's fd, so it is found as the one
    ``[infinibandevent]`` descriptor that creating the channel added (all verbs setup
    runs on the event loop thread, so nothing else opens one meanwhile).
    """
    if hasattr(CompChannel, "fd"):
        channel = CompChannel(ctx)
        return channel, channel.fd
    before = _open_fds()
    channel = CompChannel(ctx)
    new = [
        fd
        for fd, target in _open_fds().items()
        if "infinibandevent" in target and before.get(fd) != target
    ]
    if len(new) != 1:
        channel.close()
        raise OSError(f"could not find the completion channel's descriptor ({new})")
    return channel, new[0]


def locked_memory_error(device: str, size: int, depth: int, bufsize: int) -> TransportUnavailable:
    """Registering buffers failed with ENOMEM: almost always the locked-memory limit."""
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
    return TransportUnavailable(
        f"rdma: locked-memory limit ({shown}, `ulimit -l`) too low to register "
        f"{size} bytes of buffers on {device} (2 x depth {depth} x bufsize "
        f"{bufsize} per authenticated connection; registered memory is locked memory). Fix: "
        "raise the limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity for a systemd service, "
        "or a memlock line in /etc/security/limits.conf), or use smaller buffers (?bufsize=&depth=)"
    )


class Resources:
    """The pyverbs objects of one connection; ``close`` releases all of them.

    Registered at first: the handshake rings (HS_DEPTH x HS_BUFSIZE for receiving and
    for sending, slots 0 to HS_DEPTH - 1); :meth:`grow` adds the full rings (``depth``
    x ``bufsize`` each, slots HS_DEPTH on) once the peer is authenticated.
    """

    def __init__(self, device: str, port: int, depth: int, bufsize: int) -> None:
        self.device = device
        self.port = port
        self.depth = depth
        self.bufsize = bufsize
        self.psn = random.getrandbits(24)
        self.recv_wrs: list[RecvWR] = []
        self.registered = 0
        """Bytes of buffers registered for this connection."""
        self.send_keys: list[tuple[int, int]] = []
        """(address, lkey) of every send slot."""
        self.ctx = Context(name=device)
        try:
            self.port_attr = self.ctx.query_port(port)
            self.pd = PD(self.ctx)
            self.channel, self.channel_fd = _comp_channel(self.ctx)
            os.set_blocking(self.channel_fd, False)
            # Sends: depth data slots plus control messages, each bounded by the peer's credits.
            self.max_send = 2 * depth + 4
            recvs = HS_DEPTH + depth
            self.cq = CQ(self.ctx, self.max_send + recvs + 4, None, self.channel, 0)
            cap = QPCap(
                max_send_wr=self.max_send, max_recv_wr=recvs, max_send_sge=1, max_recv_sge=1
            )
            init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap)
            self.qp = QP(self.pd, init)
            self.recv_view, self.send_view = self._register("hs", HS_DEPTH, HS_BUFSIZE)
        except BaseException:
            self.close()
            raise

    def _register(self, name: str, depth: int, bufsize: int) -> tuple[memoryview, memoryview]:
        """Register a receive and a send ring of depth x bufsize; zero-copy views of them."""
        access = e.IBV_ACCESS_LOCAL_WRITE
        size = depth * bufsize
        try:
            recv_mr = self.__dict__[f"{name}_recv_mr"] = MR(self.pd, size, access)
            send_mr = self.__dict__[f"{name}_send_mr"] = MR(self.pd, size, access)
        except PyverbsRDMAError as exc:
            if exc.error_code != errno.ENOMEM:
                raise
            raise locked_memory_error(self.device, 2 * size, depth, bufsize) from None
        lkey = recv_mr.lkey
        self.recv_wrs += [
            RecvWR(
                wr_id=len(self.recv_wrs) + i,
                num_sge=1,
                sg=[SGE(recv_mr.buf + i * bufsize, bufsize, lkey)],
            )
            for i in range(depth)
        ]
        self.send_keys += [(send_mr.buf + i * bufsize, send_mr.lkey) for i in range(depth)]
        self.registered += 2 * size
        # pyverbs only offers copying read/write
        return (
            memoryview((ctypes.c_char * size).from_address(recv_mr.buf)).cast("B"),
            memoryview((ctypes.c_char * size).from_address(send_mr.buf)).cast("B"),
        )

    def grow(self) -> tuple[memoryview, memoryview]:
        """Register the full rings (TransportUnavailable over the locked-memory limit)."""
        return self._register("full", self.depth, self.bufsize)

    @property
    def qpn(self) -> int:
        return self.qp.qp_num

    def info(self, gid: bytes) -> PeerInfo:
        """What to tell the peer about this side."""
        return PeerInfo(
            self.port_attr.active_mtu, self.depth, self.bufsize, self.qpn, self.psn, gid
        )

    def to_init(self) -> None:
        """RESET -> INIT and post every receive buffer (before the peer can send: no RNR)."""
        attr = QPAttr(qp_state=e.IBV_QPS_INIT)
        attr.pkey_index = 0
        attr.port_num = self.port
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE
        mask = e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS
        self.qp.modify(attr, mask)
        for wr in self.recv_wrs:
            self.qp.post_recv(wr)

    def connect_qp(self, peer: PeerInfo, sgid_index: int) -> None:
        """INIT -> RTR -> RTS towards the peer's QP."""
        attr = QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.path_mtu = min(peer.mtu, self.port_attr.active_mtu)
        attr.dest_qp_num = peer.qpn
        attr.rq_psn = peer.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        route = GlobalRoute(dgid=GID(gid_text(peer.gid)), sgid_index=sgid_index, hop_limit=64)
        attr.ah_attr = AHAttr(port_num=self.port, is_global=1, gr=route)
        mask = (
            e.IBV_QP_STATE
            | e.IBV_QP_AV
            | e.IBV_QP_PATH_MTU
            | e.IBV_QP_DEST_QPN
            | e.IBV_QP_RQ_PSN
            | e.IBV_QP_MAX_DEST_RD_ATOMIC
            | e.IBV_QP_MIN_RNR_TIMER
        )
        self.qp.modify(attr, mask)
        attr = QPAttr(qp_state=e.IBV_QPS_RTS)
        attr.timeout = 14
        attr.retry_cnt = 7
        # Credits guarantee a posted receive for every message: a receiver-not-ready NAK
        # would be a bug, so it fails the connection at once instead of being retried.
        attr.rnr_retry = 0
        attr.sq_psn = self.psn
        attr.max_rd_atomic = 1
        mask = (
            e.IBV_QP_STATE
            | e.IBV_QP_TIMEOUT
            | e.IBV_QP_RETRY_CNT
            | e.IBV_QP_RNR_RETRY
            | e.IBV_QP_SQ_PSN
            | e.IBV_QP_MAX_QP_RD_ATOMIC
        )
        self.qp.modify(attr, mask)

    def close(self) -> None:
        """Release QP, CQ, completion channel, MRs, PD and the device context, in that order."""
        self.recv_view = self.send_view = None  # type: ignore[assignment]
        names = ("qp", "cq", "channel", "hs_recv_mr", "hs_send_mr", "full_recv_mr", "full_send_mr")
        for name in (*names, "pd", "ctx"):
            obj = self.__dict__.pop(name, None)
            if obj is not None:
                obj.close()
        self.recv_wrs = []
        self.send_keys = []
