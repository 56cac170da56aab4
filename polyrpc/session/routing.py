"""The frame decoder as a session's receiving end: decoded frames go where the session says.

``PyRoutingDecoder`` is the pure-Python reference, a subclass of the wire layer's Python
decoder; the session layer's C accelerator (polyrpc.session._routing) provides the same
``RoutingDecoder`` on top of the C decoder, resolving most replies and serving lone requests
without Python code of polyrpc's own. It is used with the C codec only
(``POLYRPC_PURE_PYTHON=1`` forces the reference).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sized
from typing import Any

from ..errors import ProtocolError
from ..wire import frames
from ..wire.frames import Frame, Kind
from .accelerator import ROUTING_DECODER

_REPLY_KINDS = (int(Kind.RESPONSE), int(Kind.ERROR))


class PyRoutingDecoder(frames.PyFrameDecoder):
    """The Python frame decoder with :meth:`route`, :meth:`received` and :meth:`received_data`."""

    def __init__(self, limits: frames.Limits | None = None, *, handshake: bool = False) -> None:
        super().__init__(limits, handshake=handshake)
        self._on_frames: Callable[[list[Frame]], object] | None = None
        self._on_error: Callable[[ProtocolError], object] | None = None
        self._replies: dict[int, asyncio.Future[Frame]] | None = None
        self._hold: Sized | None = None
        self._on_request: Callable[[Frame], object] | None = None
        self.serving_one = False
        """True while route()'s on_request serves a request that arrived alone (its reply
        can go out at once: there is nothing to batch it with)."""

    def route(
        self,
        on_frames: Callable[[list[Frame]], object],
        on_error: Callable[[ProtocolError], object],
        replies: dict[int, asyncio.Future[Frame]] | None = None,
        hold: Sized | None = None,
        on_request: Callable[[Frame], object] | None = None,
    ) -> None:
        """Where :meth:`received` and :meth:`received_data` deliver: a batch's leading
        RESPONSE and ERROR frames that answer a future in ``replies`` resolve it here (while
        ``hold`` is empty); a REQUEST left alone goes to ``on_request(frame)`` with
        :attr:`serving_one` set; other frames go to ``on_frames(list)`` in order, a
        ProtocolError to ``on_error(exc)``."""
        if not (callable(on_frames) and callable(on_error)) or (
            on_request is not None and not callable(on_request)
        ):
            raise TypeError("route(): on_frames, on_error and on_request must be callable")
        if replies is not None and type(replies) is not dict:
            raise TypeError("route(): replies must be a dict or None")
        self._on_frames, self._on_error = on_frames, on_error
        self._replies, self._hold, self._on_request = replies, hold, on_request

    def received(self, nbytes: int) -> object:
        """:meth:`buffer_updated` for a socket: the frames are delivered as :meth:`route` says
        (in the C implementation most replies and lone requests run no Python code here)."""
        return self._deliver(self.buffer_updated, nbytes, "received")

    def received_data(self, data: bytes | bytearray | memoryview) -> object:
        """:meth:`feed` for a stream that hands over bytes: delivered as :meth:`route` says."""
        return self._deliver(self.feed, data, "received_data")

    def _deliver(self, decode: Callable[[Any], list[Frame]], arg: Any, name: str) -> object:
        if self._on_frames is None or self._on_error is None:
            raise RuntimeError(f"RoutingDecoder.{name}() needs route() first")
        try:
            frames = decode(arg)
        except ProtocolError as exc:
            return self._on_error(exc)
        done = 0
        replies = self._replies
        if replies is not None:
            for frame in frames:
                if frame.kind not in _REPLY_KINDS or (self._hold is not None and len(self._hold)):
                    break
                future = replies.pop(frame.seq, None)
                if future is None:
                    break
                if not future.done():
                    future.set_result(frame)
                done += 1
        if done == len(frames):
            return None
        if done == len(frames) - 1 and self._on_request is not None:
            last = frames[-1]
            if last.kind == Kind.REQUEST:
                self.serving_one = True
                try:
                    return self._on_request(last)
                except ProtocolError as exc:
                    error = exc
                finally:
                    self.serving_one = False
                return self._on_error(error)
        return self._on_frames(frames[done:] if done else frames)


ACCELERATED = ROUTING_DECODER
"""The C routing decoder (polyrpc.session._routing, on the C codec) when it is built."""

RoutingDecoder: type = PyRoutingDecoder
"""The decoder sessions use: the C one when the C codec is in use, else the reference."""
if ACCELERATED is not None and frames.IMPLEMENTATION is frames.ACCELERATED:
    RoutingDecoder = ACCELERATED


def for_codec(codec: frames.Implementation) -> type:
    """The routing decoder built on ``codec``'s decoder (for tests running both)."""
    if codec is frames.PYTHON:
        return PyRoutingDecoder
    if ACCELERATED is None:
        raise ImportError("polyrpc.session._routing is not built")
    return ACCELERATED
