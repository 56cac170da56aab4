"""The stream trait: the one interface every transport implements.

A :class:`Stream` is a reliable, ordered, full-duplex byte stream. Writing is a
non-blocking gather write plus :meth:`Stream.drain`, which waits only while the
peer or the network is slow (bounded memory). Receiving is push-style: the stream
calls a :class:`StreamReceiver` (the frame layer), so there is no await per
message in the hot path. Modelled on trio's ``abc.Stream`` and httpcore's
``AsyncNetworkStream``, with asyncio's protocol callbacks for speed.

:class:`Stream` holds only what the session and the message/RPC layers call. What some
transports offer beyond it is declared, never looked up by name:

- buffered receive: a receiver that subclasses :class:`BufferedReceiver` lets a transport
  that reads into memory (tcp, tls, unix, kcp) read straight into the receiver's buffer;
- write-now: :attr:`Stream.write_now`, a callable or None;
- half-close: a stream that subclasses :class:`HalfClose` offers ``write_eof``.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import ConnectionLost
from .address import Address

Buffer = bytes | bytearray | memoryview

E = TypeVar("E", bound=BaseException)

DEFAULT_HIGH_WATER = 1 << 20
"""Bytes a stream may hold queued before writers must wait (drain blocks)."""
DEFAULT_LOW_WATER = 256 << 10
"""Bytes below which waiting writers are released again."""


def fresh_error(error: E) -> E:
    """A copy of ``error`` with no traceback, to raise in place of a stored one.

    Raising an exception attaches the raising frames to it; an error kept by a connection
    (its close reason) and raised again would tie those frames, and the connection they
    refer to, into a reference cycle that only the cyclic GC frees.
    """
    copy = type(error).__new__(type(error))
    copy.args = error.args
    copy.__dict__.update(error.__dict__)
    copy.__cause__ = error.__cause__
    return copy


@runtime_checkable
class StreamReceiver(Protocol):
    """What a stream delivers to. Calls come from the event loop thread, in order."""

    def data_received(self, data: Buffer) -> object:
        """Bytes arrived; the receiver must copy what it keeps (``data`` may be reused).

        What it returns is ignored.
        """

    def eof_received(self) -> None:
        """The peer finished writing (half-close or graceful close)."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The stream is gone: ``None`` after a local close, else a ConnectionLost."""


class BufferedReceiver:
    """Optional capability of a :class:`StreamReceiver`: bytes are read into its own buffer.

    asyncio's ``BufferedProtocol`` shape. A receiver declares it by subclassing this class
    and providing both members, as methods or attributes (the session binds its frame
    decoder's, so a socket reads straight into the decoder's buffer, with no bytes object
    per read). A transport that reads into memory checks ``isinstance(receiver,
    BufferedReceiver)`` once, in ``set_receiver``, and otherwise delivers through
    ``data_received``. A plain class with empty ``__slots__`` (no metaclass, no
    ``__dict__``), so the session's slotted layout stays as it is.
    """

    __slots__ = ()

    get_buffer: Callable[[int], memoryview]
    """Room for the next read, given a size hint (at least one byte)."""
    buffer_updated: Callable[[int], object]
    """``nbytes`` were written into the last ``get_buffer``; what it returns is ignored."""


class _EarlyBuffer:
    """Holds what arrives before the owner calls :meth:`Stream.set_receiver`."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def data_received(self, data: Buffer) -> None:
        self.events.append(("data_received", bytes(data)))

    def eof_received(self) -> None:
        self.events.append(("eof_received", None))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("connection_lost", exc))

    def replay(self, receiver: StreamReceiver) -> None:
        for name, arg in self.events:
            if name == "eof_received":
                receiver.eof_received()
            else:
                getattr(receiver, name)(arg)
        self.events.clear()


class _Discard:
    """A receiver that drops whatever arrives: for a stream whose connection is gone, or one
    refused before its handshake."""

    def data_received(self, data: Buffer) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


DISCARD = _Discard()


class Stream(ABC):
    """A connected byte stream. Subclasses implement the abstract methods.

    The members are what the core calls: receiving (``set_receiver``, ``pause_reading``,
    ``resume_reading``), sending (``write``, ``write_now``, ``writing_paused``,
    ``on_write_pressure``, ``drain``), closing (``close``, ``abort``, ``is_closing``) and
    information (``transport_name``, ``extra``, ``get_extra_info``, ``handshake_done``);
    ``send`` is ``write`` plus ``drain`` for direct users of a stream; ``receiver``,
    ``high_water``, ``low_water`` and ``write_buffer_size`` serve implementations (the
    backpressure below is computed from them). Optional capabilities are declared (see
    the module docstring): :class:`HalfClose` and :attr:`write_now` here,
    :class:`BufferedReceiver` on the receiving side.

    Contract for implementers:
    - call ``self.receiver.data_received`` / ``eof_received`` / ``connection_lost``
      (exactly one ``connection_lost``, last) from the event loop thread;
    - honour :meth:`pause_reading` by not delivering data until resumed, so a slow
      reader stops the peer's writer (backpressure end to end);
    - keep :attr:`write_buffer_size` honest and wake :meth:`drain` waiters via
      :meth:`_update_write_pressure` whenever it changes.
    """

    transport_name: str = "?"

    def __init__(
        self,
        extra: dict[str, Any] | None = None,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        self.extra: dict[str, Any] = {"transport": self.transport_name, **(extra or {})}
        self.receiver: StreamReceiver = _EarlyBuffer()
        self.high_water = high_water
        self.low_water = low_water
        self._drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False
        """True while writers should wait (more than high-water bytes queued); an attribute,
        not a property: the session checks it on every call."""
        self.on_write_pressure: Callable[[bool], object] | None = None
        """Told each time :attr:`writing_paused` changes (with its new value): a session that
        serves requests stops reading from a peer that does not read its replies."""
        self._lost: Exception | None = None
        self._closed = False
        self.write_now: Callable[[Buffer], object] | None = None
        """Optional capability: a callable that sends one whole buffer at once, or None.

        A single-stream transport may set it (tcp, tls, unix: asyncio's own
        ``transport.write``; rdma) so the session's lone frames run no Python code of the
        stream; the session uses it in place of ``write([buffer])`` when it is not None.
        It must be None whenever :meth:`write` would refuse (closing, closed, lost, after
        ``write_eof``)."""

    # -- receiving ---------------------------------------------------------
    def set_receiver(self, receiver: StreamReceiver) -> None:
        """Start delivering to ``receiver``; anything that arrived earlier is replayed first."""
        early = self.receiver
        self.receiver = receiver
        if isinstance(early, _EarlyBuffer):
            early.replay(receiver)

    def handshake_done(self) -> None:  # noqa: B027 (a hook most transports need not use)
        """The session authenticated the peer (polyrpc HELLO exchanged): a transport that
        keeps a connection's buffers small until then may now give it its full ones."""

    @abstractmethod
    def pause_reading(self) -> None:
        """Stop delivering data (the peer's writer will eventually block)."""

    @abstractmethod
    def resume_reading(self) -> None:
        """Deliver data again after :meth:`pause_reading`."""

    # -- sending -----------------------------------------------------------
    @abstractmethod
    def write(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        """Queue ``buffers`` to be sent as one gather write; never blocks.

        The session always writes whole frames, never part of one. ``ordered=False``
        marks a unit that may overtake other units (independent requests and their
        responses): a multi-stream transport such as QUIC may carry it on its own
        stream so a loss elsewhere does not delay it. Ordered units keep their order
        among themselves. Single-stream transports simply ignore the flag.
        The buffers must not be mutated afterwards. Raises ConnectionLost if the
        stream is closing or broken.
        """

    @property
    @abstractmethod
    def write_buffer_size(self) -> int:
        """Bytes accepted by :meth:`write` but not yet handed to the network or peer."""

    async def drain(self) -> None:
        """Wait until the queued bytes fall below the low-water mark."""
        if self._lost is not None:
            raise fresh_error(self._lost)
        if not self.writing_paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drain_waiter)

    async def send(self, buffers: Sequence[Buffer], *, ordered: bool = True) -> None:
        """:meth:`write` then wait only if the stream is over its high-water mark."""
        self.write(buffers, ordered=ordered)
        if self.writing_paused:
            await self.drain()

    def _update_write_pressure(self) -> None:
        """Recompute the paused state from :attr:`write_buffer_size`; wake drain waiters."""
        size = self.write_buffer_size
        if not self.writing_paused and size > self.high_water:
            self._set_writing_paused(True)
        elif self.writing_paused and size <= self.low_water:
            self._set_writing_paused(False)

    def _set_writing_paused(self, paused: bool) -> None:
        """Enter or leave the paused state: wake drain waiters, tell ``on_write_pressure``."""
        self.writing_paused = paused
        if not paused:
            self._wake_drain(None)
        if self.on_write_pressure is not None:
            self.on_write_pressure(paused)

    def _wake_drain(self, exc: Exception | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(fresh_error(exc))
                waiter.exception()  # mark retrieved: shield() callers get it anyway

    # -- closing -----------------------------------------------------------
    @abstractmethod
    async def close(self) -> None:
        """Graceful close: send what is queued, then close. Idempotent."""

    @abstractmethod
    def abort(self) -> None:
        """Close at once, dropping queued data; the peer sees a reset. Idempotent."""

    @property
    def is_closing(self) -> bool:
        """True once close/abort was called or the connection was lost."""
        return self._closed or self._lost is not None

    def _connection_lost(self, exc: Exception | None) -> None:
        """Implementations call this once when the underlying connection is gone."""
        if self._lost is not None:
            return
        lost = exc if isinstance(exc, ConnectionLost) else None
        if lost is None:
            reason = f": {exc}" if exc else ""
            lost = ConnectionLost(f"{self.transport_name} connection closed{reason}")
            if exc is not None:
                # the OS error's traceback holds the frames (and the session) that wrote
                lost.__cause__ = exc.with_traceback(None)
        self._lost = lost
        clean = exc is None and self._closed
        # a graceful close sent everything queued: whoever waited for room was not failed
        self._wake_drain(None if clean else lost)
        receiver = self.receiver
        self.on_write_pressure = None
        # the receiver (a session) refers back to this stream: letting go of it here means
        # a finished connection is freed at once, without waiting for the cyclic GC. An
        # early buffer stays: it replays the loss to the receiver set after it
        if not isinstance(receiver, _EarlyBuffer):
            self.receiver = DISCARD
        receiver.connection_lost(None if clean else lost)

    def _check_writable(self) -> None:
        if self._lost is not None:
            raise fresh_error(self._lost)
        if self._closed:
            raise ConnectionLost(f"{self.transport_name} stream is closed")

    # -- info --------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Peer/local address, transport name, TLS details, MTU... (see ``extra``)."""
        return self.extra.get(name, default)

    def __repr__(self) -> str:
        peer = self.extra.get("peer")
        return f"<{type(self).__name__} {self.transport_name} peer={peer!r}>"


class HalfClose(ABC):
    """Optional capability of a :class:`Stream`: half-close. A stream declares it by subclassing.

    The core never half-closes (a session ends with ``close``); direct users of a stream
    (tests, tools) may. Every built-in stream has it.
    """

    __slots__ = ()

    @property
    def can_write_eof(self) -> bool:
        """False where this connection cannot half-close after all: ``write_eof`` raises."""
        return True

    @abstractmethod
    def write_eof(self) -> None:
        """Half-close: the peer sees EOF after the queued data; receiving goes on."""


StreamHandler = Callable[[Stream], None]
"""Called synchronously with each accepted stream; it should call ``set_receiver``."""


class Listener(ABC):
    """A bound endpoint accepting streams. ``address`` has the real port when 0 was asked."""

    def __init__(self, address: Address) -> None:
        self.address = address

    @property
    def url(self) -> str:
        """The URL clients dial (bound host and port, no listener-side options)."""
        return str(self.address.without_options())

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting new streams; established streams are not affected."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
