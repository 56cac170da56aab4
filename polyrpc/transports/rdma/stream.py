"""RdmaStream: the stream trait over one Reliable Connected QP.

Data path (the decisions in the sans-IO :class:`RdmaEngine`, engine.py): each side
pre-posts small handshake receive buffers, then ``depth`` buffers of ``bufsize``
bytes once the session's handshake is done (:meth:`RdmaStream.handshake_done`).
Bytes are sent as SEND-with-immediate messages that fit the peer's next buffers;
the 32-bit immediate carries the message kind and the credits being returned.
A sender spends one credit per message and never sends without one, so the
receiver never sees receiver-not-ready. The last credit is reserved for pure
credit updates, so both sides can always hand credits back (no deadlock).
Sends queued while handling one event go out as one chain of work requests
(one ibv_post_send). After a send the stream polls the CQ for up to ``spin``
microseconds, since the answer often comes sooner than a completion-channel
wake-up would (spins that find nothing make the next ones rarer, and an idle
stream never spins). Otherwise completions wake the loop through the completion
channel's fd: read and acknowledge the event, drain the CQ, and before the loop
may sleep, re-arm the CQ and poll it once more (arming only signals later
completions, so one that came before the arming is taken by that poll: no lost
wake-ups, no busy loop when idle). A new stream arms and then polls too: the
peer's first message can beat the stream's creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyverbs.enums as e
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.wr import SGE, SendWR

from ...errors import ConnectionLost, ProtocolError, TransportUnavailable
from ...stream.trait import Buffer, HalfClose, Stream
from . import cm
from .engine import CLOSE, NO_SLOT, PeerInfo, RdmaEngine, Send
from .verbs import Resources

log = logging.getLogger("polyrpc")
CLOSE_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 3.0
POLL_BATCH = 32
SPIN_BACKOFF_MAX = 64
"""After spins that found nothing, at most this many posts in a row go without one."""

WC_SUCCESS = e.IBV_WC_SUCCESS
WC_RECV = e.IBV_WC_RECV
SIGNALED = e.IBV_SEND_SIGNALED
_ntohl = socket.ntohl
_htonl = socket.htonl

_WC_NAMES = {
    value: name[len("IBV_WC_") :].lower()
    for name, value in vars(e).items()
    if name.startswith("IBV_WC_") and name.endswith("_ERR")
}


class _Verbs:
    """The engine's device: posts to the QP, registers the full rings (no link back to the
    stream, so a released stream is freed without the cyclic GC)."""

    def __init__(self, res: Resources) -> None:
        self._res = res
        # A fixed linked list of send WRs (each with its own SGE) ending in NULL: a batch of
        # n sends fills the last n and posts them with one ibv_post_send (one doorbell).
        self._sges: list[SGE] = []
        self._chain: list[SendWR] = []
        following = None
        addr, lkey = res.send_keys[0]
        for _ in range(res.max_send):
            sge = SGE(addr, 0, lkey)
            wr = SendWR(opcode=e.IBV_WR_SEND_WITH_IMM, num_sge=1, sg=[sge], next_wr=following)
            wr.sg_list = sge  # the WR reads this SGE object, refilled for every post
            self._sges.append(sge)
            self._chain.append(wr)
            following = wr
        self._sges.reverse()
        self._chain.reverse()

    def post_recv(self, slot: int) -> None:
        self._res.qp.post_recv(self._res.recv_wrs[slot])

    def post_sends(self, batch: list[Send]) -> None:
        """Post the batch as the tail of the fixed chain of work requests."""
        chain, sges = self._chain, self._sges
        first = len(chain) - len(batch)
        keys = self._res.send_keys
        for i, (wr_id, slot, length, signaled, imm) in enumerate(batch, first):
            sge = sges[i]
            sge.addr, sge.lkey = keys[slot if slot != NO_SLOT else 0]
            sge.length = length
            wr = chain[i]
            wr.wr_id = wr_id
            wr.send_flags = SIGNALED if signaled else 0
            wr.imm_data = _htonl(imm)
        self._res.qp.post_send(chain[first])

    def grow(self) -> tuple[memoryview, memoryview]:
        return self._res.grow()


class RdmaStream(Stream, HalfClose):
    """A connected RDMA stream (RC QP, SEND/RECV with credits; the logic in :class:`RdmaEngine`)."""

    transport_name = "rdma"

    def __init__(
        self,
        cm_id: cm.CmId,
        res: Resources,
        peer: PeerInfo,
        extra: dict[str, Any],
        spin_seconds: float = 0.0,
    ):
        super().__init__(extra)
        self._loop = asyncio.get_running_loop()
        self._id = cm_id
        self._res = res
        self._engine = RdmaEngine(
            _Verbs(res),
            res.recv_view,
            res.send_view,
            res.depth,
            res.bufsize,
            res.max_send,
            peer.depth,
            peer.bufsize,
            lambda data: self.receiver.data_received(data),
            lambda: self.receiver.eof_received(),
        )
        self._spin_seconds = spin_seconds
        self._spin_due = False
        self._spin_skip = 0  # posts left to go without a spin after spins that found nothing
        self._spin_backoff = 1
        self._armed = True
        self._close_sent: asyncio.Future[None] | None = None
        self._flushed: asyncio.Future[None] | None = None
        self._peer_gone = False
        self._disconnected: asyncio.Future[None] = self._loop.create_future()
        self._released = False
        self.on_first_message: Callable[[], None] | None = None
        self.write_now = self._write_now
        """Set by the listener until the connection is known to be established."""
        res.cq.req_notify()
        self._loop.add_reader(res.channel_fd, self._on_completion_event)
        # The QP took messages before the CQ was armed (the peer may send as soon as it is
        # connected, and this process may be descheduled in between): arming signals only
        # completions that come later, so look at the CQ once, after the owner (listener
        # or dialer) attached its hooks.
        self._loop.call_soon(self._poll)

    def handshake_done(self) -> None:
        """The session authenticated the peer: register the full rings, tell the peer."""
        if self._released or self._peer_gone:
            return
        try:
            self._engine.grow()
        except TransportUnavailable as exc:
            log.warning("rdma connection to %s dropped: %s", self.extra.get("peer"), exc)
            self._fail(ConnectionLost(str(exc)))
            return
        self._pump()  # GROW, and data that waited for the peer's handshake buffers

    @property
    def registered_bytes(self) -> int:
        """Bytes of buffers this connection has registered (locked memory)."""
        return self._res.registered

    # -- rdma_cm events ------------------------------------------------------
    def on_cm_event(self, event: cm.Event) -> None:
        """DISCONNECTED (peer closed, died, or answered our disconnect) and device loss."""
        if event.kind in (cm.DISCONNECTED, cm.DEVICE_REMOVAL, cm.ADDR_CHANGE):
            if not self._disconnected.done():
                self._disconnected.set_result(None)
            if self._released:
                return
            self._poll()  # completions that arrived before the disconnect
            self._gone()
            if self._closed:
                self._wake_closer()  # close() finishes the job
                return
            if self._engine.peer_closed:
                self._finish_when_delivered()
            else:
                why = (
                    "the RDMA device went away"
                    if event.kind == cm.DEVICE_REMOVAL
                    else "the peer disconnected without closing (process died or link lost)"
                )
                peer = self.extra.get("peer")
                self._fail(ConnectionLost(f"rdma connection to {peer} lost: {why}"))

    # -- completions ---------------------------------------------------------
    def _on_completion_event(self) -> None:
        res = self._res
        try:
            res.channel.get_cq_event(res.cq)
        except PyverbsError:
            pass  # spurious wake-up: nothing to acknowledge
        else:
            res.cq.ack_events(1)
            self._armed = False
        self._poll()
        if not self._spin_due:  # else the spin re-arms if it finds nothing
            self._arm()

    def _arm(self) -> None:
        """Ask for an event on the next completion, then take what came before the arming."""
        if self._released:
            return
        if not self._armed:
            self._armed = True
            self._res.cq.req_notify()
        self._poll()

    def _poll(self) -> None:
        if self._released:
            return
        cq = self._res.cq
        while True:
            count, wcs = cq.poll(POLL_BATCH)
            if not self._handle(wcs):
                return
            if count < POLL_BATCH:
                break
        self._pump()

    def _handle(self, wcs: list) -> bool:
        """Process work completions; False once the stream failed or was released."""
        engine = self._engine
        for wc in wcs:
            if wc.status != WC_SUCCESS:
                engine.deliver_run()
                if not self._released:
                    self._wc_error(wc)
                return False
            if wc.opcode & WC_RECV:
                if self.on_first_message is not None:
                    self.on_first_message()
                try:
                    engine.on_recv(wc.wr_id, wc.byte_len, _ntohl(wc.imm_data))
                except ProtocolError as exc:
                    if not self._released:
                        self._fail(
                            ConnectionLost(
                                f"rdma peer {self.extra.get('peer')} broke the protocol: {exc}"
                            )
                        )
                    return False
            else:
                engine.on_send_done(wc.wr_id)
                sent = self._close_sent
                if wc.wr_id == engine.close_seq and sent is not None and not sent.done():
                    sent.set_result(None)
            if self._released:
                return False
        engine.deliver_run()
        return not self._released

    def _spin(self) -> None:
        """After sending, poll the CQ for a short bounded time before the loop sleeps.

        A reply that arrives within the spin is taken without the completion-channel
        wake-up, which costs far more than a poll (an idle stream never spins: only a
        post schedules this).
        """
        self._spin_due = False
        if self._released:
            return
        cq = self._res.cq
        clock = time.perf_counter
        deadline = clock() + self._spin_seconds
        received = self._engine.received
        while True:
            count, wcs = cq.poll(POLL_BATCH)
            if count:
                if not self._handle(wcs):
                    return
                if self._engine.received != received:
                    self._spin_backoff = 1
                    if count == POLL_BATCH:
                        self._poll()  # the rest, then send what the completions allow
                    else:
                        self._pump()
                    if not self._spin_due:
                        # Arm only if the next loop turn posts nothing (a post spins instead):
                        # a ping-pong then never arms, so no completion event per message.
                        self._loop.call_soon(self._arm_unless_spinning)
                    return
            elif clock() >= deadline:
                # the peer answers slowly: skip the next 1, 2, 4 ... spins (bounded CPU)
                self._spin_skip = self._spin_backoff
                self._spin_backoff = min(SPIN_BACKOFF_MAX, 2 * self._spin_backoff)
                self._arm()
                return

    def _arm_unless_spinning(self) -> None:
        if not self._spin_due:
            self._arm()

    def _wc_error(self, wc) -> None:
        if self._closed:
            self._wake_closer()  # the peer is gone while we close: nothing left to flush
        if self._released or self._peer_gone or self._closed:
            return  # flushed work requests during teardown
        name = _WC_NAMES.get(wc.status, str(wc.status))
        self._fail(
            ConnectionLost(
                f"rdma work request failed on {self.extra.get('peer')}: {name} "
                f"(vendor error {wc.vendor_err})"
            )
        )

    def _gone(self) -> None:
        """The peer is gone: nothing is posted any more."""
        self._peer_gone = True
        self._engine.stopped = True

    # -- sending ---------------------------------------------------------------
    def _flush(self) -> None:
        """Post the engine's queued sends, then maybe spin for the answer."""
        if not self._engine.flush():
            return
        if self._spin_skip:
            self._spin_skip -= 1
        elif self._spin_seconds > 0 and not self._spin_due:
            self._spin_due = True
            self._loop.call_soon(self._spin)

    def _pump(self) -> None:
        """Send queued bytes while credits and send slots allow; hand back owed credits."""
        engine = self._engine
        if engine.pump():
            self._update_write_pressure()
        if engine.queue_empty and self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)
        self._flush()

    def _write_now(self, frame: Buffer) -> None:
        """Send one whole frame (the session's lone frames): straight into a free slot and
        posted when it fits one message and nothing is queued, else through :meth:`write`."""
        if self._engine.send_now(frame):
            self._flush()
        else:
            self.write([frame])

    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        self._check_writable()
        if self._engine.eof_queued:
            raise ConnectionLost("rdma stream: write after write_eof")
        self._engine.write(buffers)
        self._pump()

    @property
    def write_buffer_size(self) -> int:
        return self._engine.queued

    def write_eof(self) -> None:
        self._check_writable()
        if not self._engine.eof_queued:
            self.write_now = None
            self._engine.write_eof()
            self._pump()

    # -- receiving control -------------------------------------------------------
    def pause_reading(self) -> None:
        self._engine.paused = True

    def resume_reading(self) -> None:
        if not self._engine.paused:
            return
        self._engine.resume()
        self._pump()
        if self._peer_gone and self._engine.all_delivered and not self._released:
            self._finish_when_delivered()

    def _finish_when_delivered(self) -> None:
        if not self._engine.all_delivered:
            return  # resume_reading delivers the rest, then finishes
        self._release()
        self._connection_lost(None)

    # -- closing -------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            if not self._released:
                await asyncio.shield(self._disconnected)
            return
        self._closed = True
        self.write_now = None
        if self._lost is None and not self._peer_gone:
            with contextlib.suppress(TimeoutError, ConnectionLost):
                await asyncio.wait_for(self._send_close(), CLOSE_TIMEOUT)
        if not self._peer_gone and not self._released:
            self._id.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._disconnected), DISCONNECT_TIMEOUT)
        self._release()
        self._connection_lost(None)

    async def _send_close(self) -> None:
        if not self._engine.queue_empty:
            self._flushed = self._loop.create_future()
            await self._flushed
        while self._engine.credits < 1 and not self._peer_gone and not self._released:
            waiter = self._flushed = self._loop.create_future()
            self._loop.call_later(0.01, lambda w=waiter: w.done() or w.set_result(None))  # type: ignore[misc]
            await waiter
        if self._peer_gone or self._released:
            return
        self._close_sent = self._loop.create_future()
        self._engine.close_seq = self._engine.post(CLOSE, signal=True)
        self._flush()
        await self._close_sent

    def _wake_closer(self) -> None:
        """Let a pending close() stop waiting for a flush or the CLOSE acknowledgement."""
        self._gone()
        for fut in (self._flushed, self._close_sent):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def abort(self) -> None:
        if self._released:
            return
        self._closed = True
        self.write_now = None
        self._release()
        self._connection_lost(None)

    def _fail(self, exc: ConnectionLost) -> None:
        self._release()
        self._connection_lost(exc)

    def _release(self) -> None:
        """Free every verbs and rdma_cm resource of this stream (idempotent)."""
        if self._released:
            return
        self._released = True
        self.write_now = None
        self._engine.clear()
        for fut in (self._flushed, self._close_sent):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionLost("rdma stream closed"))
                fut.exception()
        self._loop.remove_reader(self._res.channel_fd)
        self._res.close()
        self._id.destroy()
        if not self._disconnected.done():
            self._disconnected.set_result(None)
