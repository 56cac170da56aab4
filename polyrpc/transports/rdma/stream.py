"""RdmaStream: the stream trait over one Reliable Connected QP.

Data path: each side pre-posts ``depth`` receive buffers of ``bufsize`` bytes.
Bytes are sent as SEND-with-immediate messages of at most the peer's bufsize;
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
import collections
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyverbs.enums as e
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.wr import SGE, SendWR

from ...core.errors import ConnectionLost
from ...core.stream import Buffer, Stream
from . import cm
from .verbs import PeerInfo, Resources

DATA, EOF, CLOSE, CREDIT = 0, 1, 2, 3
KIND_SHIFT = 24
CREDIT_MASK = (1 << KIND_SHIFT) - 1
NO_SLOT = -1
"""Send-queue entry of a message without payload (EOF, CLOSE, credit update)."""
CLOSE_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 3.0
POLL_BATCH = 32
SPIN_BACKOFF_MAX = 64
"""After spins that found nothing, at most this many posts in a row go without one."""

WC_SUCCESS = e.IBV_WC_SUCCESS
WC_RECV = e.IBV_WC_RECV
_ntohl = socket.ntohl
_htonl = socket.htonl

_WC_NAMES = {
    value: name[len("IBV_WC_") :].lower()
    for name, value in vars(e).items()
    if name.startswith("IBV_WC_") and name.endswith("_ERR")
}


class RdmaStream(Stream):
    """A connected RDMA stream (RC QP, SEND/RECV with credits)."""

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
        self._peer_bufsize = peer.bufsize
        # flow control
        self._credits = peer.depth
        self._owed = 0
        self._granted = res.depth  # receive buffers the peer was told about
        self._received = 0
        self._credit_threshold = max(1, res.depth // 4)
        # sending
        self._queue: collections.deque[memoryview | int] = collections.deque()
        self._queued = 0
        # Send slots are taken and freed in order (an RC completion retires every earlier
        # send), so the free ones always run on consecutively, wrapping at the end.
        self._free_slots = collections.deque(range(res.depth))
        # Posted sends in order: (sequence number = wr_id, slot). Only every
        # ``_signal_every``-th send asks for a completion; on RC a completion also
        # retires every earlier send, which frees their slots (fewer wake-ups).
        self._sq: collections.deque[tuple[int, int]] = collections.deque()
        self._seq = 0
        self._since_signal = 0
        self._signal_every = max(1, min(res.depth, res.max_send) // 4)
        self._close_seq = -1
        # A fixed linked list of send WRs (each with its own SGE) ending in NULL: a batch of
        # n sends fills the last n and posts them with one ibv_post_send (one doorbell).
        self._sges: list[SGE] = []
        self._chain: list[SendWR] = []
        following = None
        for _ in range(res.max_send):
            sge = SGE(res.send_mr.buf, 0, res.send_mr.lkey)
            wr = SendWR(opcode=e.IBV_WR_SEND_WITH_IMM, num_sge=1, sg=[sge], next_wr=following)
            wr.sg_list = sge  # the WR reads this SGE object, refilled for every post
            self._sges.append(sge)
            self._chain.append(wr)
            following = wr
        self._sges.reverse()
        self._chain.reverse()
        self._batch: list[tuple[int, int, int, int, int]] = []
        self._spin_seconds = spin_seconds
        self._spin_due = False
        self._spin_skip = 0  # posts left to go without a spin after spins that found nothing
        self._spin_backoff = 1
        self._armed = True
        self._eof_queued = False
        self._close_sent: asyncio.Future[None] | None = None
        self._flushed: asyncio.Future[None] | None = None
        # receiving
        self._paused = False
        self._pending: collections.deque[tuple[int, int, int]] = collections.deque()
        # Full DATA messages in consecutive receive slots are contiguous bytes: they are
        # delivered as one run (slot, bytes, messages), so the reader copies once.
        self._run_slot = 0
        self._run_len = 0
        self._run_count = 0
        self._peer_closed = False
        self._eof_delivered = False
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

    # -- rdma_cm events ------------------------------------------------------
    def on_cm_event(self, event: cm.Event) -> None:
        """DISCONNECTED (peer closed, died, or answered our disconnect) and device loss."""
        if event.kind in (cm.DISCONNECTED, cm.DEVICE_REMOVAL, cm.ADDR_CHANGE):
            if not self._disconnected.done():
                self._disconnected.set_result(None)
            if self._released:
                return
            self._poll()  # completions that arrived before the disconnect
            self._peer_gone = True
            if self._closed:
                self._wake_closer()  # close() finishes the job
                return
            if self._peer_closed:
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
        for wc in wcs:
            if wc.status != WC_SUCCESS:
                if self._run_count:
                    self._deliver_run()
                if not self._released:
                    self._wc_error(wc)
                return False
            if wc.opcode & WC_RECV:
                self._on_recv(wc.wr_id, wc.byte_len, _ntohl(wc.imm_data))
            else:
                self._on_send_done(wc.wr_id)
            if self._released:
                return False
        if self._run_count:
            self._deliver_run()
            return not self._released
        return True

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
        received = self._received
        while True:
            count, wcs = cq.poll(POLL_BATCH)
            if count:
                if not self._handle(wcs):
                    return
                if self._received != received:
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

    def _on_send_done(self, wr_id: int) -> None:
        sq = self._sq
        while sq and sq[0][0] <= wr_id:
            _, slot = sq.popleft()
            if slot != NO_SLOT:
                self._free_slots.append(slot)
        sent = self._close_sent
        if wr_id == self._close_seq and sent is not None and not sent.done():
            sent.set_result(None)

    def _on_recv(self, slot: int, length: int, imm: int) -> None:
        if self.on_first_message is not None:
            self.on_first_message()
        self._received += 1
        self._credits += imm & CREDIT_MASK
        kind = imm >> KIND_SHIFT
        if kind == CREDIT:
            self._repost(slot)
            return
        count = self._run_count
        if count:
            if (
                kind == DATA
                and slot == self._run_slot + count
                and self._run_len == count * self._res.bufsize
            ):
                self._run_len += length
                self._run_count = count + 1
                return
            self._deliver_run()
        if self._paused or self._pending:
            self._pending.append((kind, slot, length))
        elif kind == DATA:
            self._run_slot = slot
            self._run_len = length
            self._run_count = 1
        else:
            self._deliver(kind, slot, length)

    def _deliver_run(self) -> None:
        """Hand the collected DATA messages to the reader as one buffer, then repost them."""
        slot, count = self._run_slot, self._run_count
        self._run_count = 0
        start = slot * self._res.bufsize
        self.receiver.data_received(self._res.recv_view[start : start + self._run_len])
        for i in range(slot, slot + count):
            self._repost(i)

    def _deliver(self, kind: int, slot: int, length: int) -> None:
        if kind == DATA:
            start = slot * self._res.bufsize
            self.receiver.data_received(self._res.recv_view[start : start + length])
            self._repost(slot)
        elif kind == EOF:
            self._repost(slot)
            self._eof_delivered = True
            self.receiver.eof_received()
        elif kind == CLOSE:
            self._peer_closed = True
            if not self._eof_delivered:
                self._eof_delivered = True
                self.receiver.eof_received()

    def _repost(self, slot: int) -> None:
        if self._released or self._peer_gone:
            return
        self._res.qp.post_recv(self._res.recv_wrs[slot])
        self._owed += 1

    # -- sending ---------------------------------------------------------------
    def _post(self, kind: int, slot: int = NO_SLOT, length: int = 0, signal: bool = False) -> int:
        """Queue one SEND-with-immediate for :meth:`_flush`; returns its sequence number (wr_id)."""
        self._seq += 1
        wr_id = self._seq
        self._since_signal += 1
        if signal or self._since_signal >= self._signal_every:
            self._since_signal = 0
            flags = e.IBV_SEND_SIGNALED
        else:
            flags = 0
        addr = self._res.send_mr.buf + (slot * self._res.bufsize if slot != NO_SLOT else 0)
        imm = (kind << KIND_SHIFT) | self._owed
        self._granted += self._owed
        self._owed = 0
        self._batch.append((wr_id, addr, length, flags, _htonl(imm)))
        self._credits -= 1
        self._sq.append((wr_id, slot))
        return wr_id

    def _flush(self) -> None:
        """Post the queued sends as one chain of work requests."""
        batch = self._batch
        if not batch:
            return
        chain, sges = self._chain, self._sges
        first = len(chain) - len(batch)
        for i, (wr_id, addr, length, flags, imm) in enumerate(batch, first):
            sge = sges[i]
            sge.addr = addr
            sge.length = length
            wr = chain[i]
            wr.wr_id = wr_id
            wr.send_flags = flags
            wr.imm_data = imm
        batch.clear()
        self._res.qp.post_send(chain[first])
        if self._spin_skip:
            self._spin_skip -= 1
        elif self._spin_seconds > 0 and not self._spin_due:
            self._spin_due = True
            self._loop.call_soon(self._spin)

    def _pump(self) -> None:
        """Send queued bytes while credits and send slots allow; hand back owed credits."""
        if self._released or self._peer_gone:
            return
        if self._queue:
            self._send_queued()
        if not self._queue and self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)
        if self._owed:
            self._maybe_return_credits()
        if self._batch:
            self._flush()

    def _send_queued(self) -> None:
        """Copy queued bytes into free send slots, one message per slot, while credits allow."""
        res = self._res
        queue = self._queue
        free = self._free_slots
        size = res.bufsize
        bufsize = min(size, self._peer_bufsize)
        view = res.send_view
        while queue and self._credits >= 2 and len(self._sq) < res.max_send:
            head = queue[0]
            if isinstance(head, int):  # EOF marker
                queue.popleft()
                self._post(EOF)
                continue
            if not free:
                break
            slot = free[0]
            # Fill as many consecutive free slots as credits allow with one copy per chunk
            # (far fewer, larger copies for bulk data), then post one message per slot.
            room = bufsize
            if self._queued > bufsize and bufsize == size:
                run = min(len(free), res.depth - slot, self._credits - 1)
                room = min(run, res.max_send - len(self._sq)) * bufsize
            base = slot * size
            filled = 0
            while queue and filled < room and not isinstance(queue[0], int):
                chunk = queue[0]
                take = min(len(chunk), room - filled)
                view[base + filled : base + filled + take] = chunk[:take]
                filled += take
                if take == len(chunk):
                    queue.popleft()
                else:
                    queue[0] = chunk[take:]
            self._queued -= filled
            for offset in range(0, filled, bufsize):
                free.popleft()
                self._post(DATA, slot, min(bufsize, filled - offset))
                slot += 1
        self._update_write_pressure()

    def _maybe_return_credits(self) -> None:
        if self._owed == 0 or self._credits < 1 or len(self._sq) >= self._res.max_send:
            return
        peer_can_send = self._granted - self._received
        if self._owed >= self._credit_threshold or peer_can_send <= 1:
            self._post(CREDIT)

    def _write_now(self, frame: Buffer) -> None:
        """Send one whole frame (the session's lone frames): straight into a free slot and
        posted when it fits one message and nothing is queued, else through :meth:`write`."""
        res = self._res
        size = len(frame)
        if (
            self._queue
            or self._peer_gone
            or size > self._peer_bufsize
            or size > res.bufsize
            or self._credits < 2
            or not self._free_slots
            or len(self._sq) >= res.max_send
            or type(frame) not in (bytes, bytearray)
        ):
            self.write([frame])
            return
        slot = self._free_slots.popleft()
        base = slot * res.bufsize
        res.send_view[base : base + size] = frame
        self._post(DATA, slot, size)
        self._flush()

    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        self._check_writable()
        if self._eof_queued:
            raise ConnectionLost("rdma stream: write after write_eof")
        for buf in buffers:
            if len(buf):
                view = memoryview(buf).cast("B")
                self._queue.append(view)
                self._queued += len(view)
        self._pump()

    @property
    def write_buffer_size(self) -> int:
        return self._queued

    @property
    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._check_writable()
        if not self._eof_queued:
            self._eof_queued = True
            self.write_now = None
            self._queue.append(EOF)
            self._pump()

    # -- receiving control -------------------------------------------------------
    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        while self._pending and not self._paused and not self._released:
            kind, slot, length = self._pending.popleft()
            self._deliver(kind, slot, length)
        self._pump()
        if self._peer_gone and not self._pending and not self._released:
            self._finish_when_delivered()

    def _finish_when_delivered(self) -> None:
        if self._pending:
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
        if self._queue:
            self._flushed = self._loop.create_future()
            await self._flushed
        while self._credits < 1 and not self._peer_gone and not self._released:
            waiter = self._flushed = self._loop.create_future()
            self._loop.call_later(0.01, lambda w=waiter: w.done() or w.set_result(None))  # type: ignore[misc]
            await waiter
        if self._peer_gone or self._released:
            return
        self._close_sent = self._loop.create_future()
        self._close_seq = self._post(CLOSE, signal=True)
        self._flush()
        await self._close_sent

    def _wake_closer(self) -> None:
        """Let a pending close() stop waiting for a flush or the CLOSE acknowledgement."""
        self._peer_gone = True
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
        self._queue.clear()
        self._queued = 0
        self._pending.clear()
        self._run_count = 0
        for fut in (self._flushed, self._close_sent):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionLost("rdma stream closed"))
                fut.exception()
        self._loop.remove_reader(self._res.channel_fd)
        self._res.close()
        self._id.destroy()
        if not self._disconnected.done():
            self._disconnected.set_result(None)
