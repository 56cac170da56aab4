"""The session state the RPC layer's C call server reads and writes on every reply.

``PySessionState`` is the pure-Python reference: the six attributes as ``__slots__``. The
session layer's C accelerator (polyrpc.session._routing) provides ``SessionState``, which owns
the same six as declared C fields (polyrpc/session/_state.h), so the call server reads them
directly instead of by name. Sessions derive from :data:`SessionState`; it is the C type
when the C codec is in use (``POLYRPC_PURE_PYTHON=1`` forces the reference).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..stream.trait import Stream
from ..wire import frames
from .accelerator import SESSION_STATE


class PySessionState:
    """A session's base: the attributes the C call server uses, as slots."""

    __slots__ = ("_flush_handle", "_gone", "_in_receive", "_send_check", "byte_stream", "bytes_out")

    byte_stream: Stream
    bytes_out: int
    _gone: bool
    _send_check: int
    _in_receive: bool
    _flush_handle: asyncio.Handle | None


ACCELERATED = SESSION_STATE
"""The C SessionState (polyrpc.session._routing) when it is built."""

SessionState = PySessionState
"""The base sessions use: the C one when the C codec is in use, else the reference (which
type checkers see: both have the same attributes)."""
if not TYPE_CHECKING and ACCELERATED is not None and frames.IMPLEMENTATION is frames.ACCELERATED:
    SessionState = ACCELERATED
