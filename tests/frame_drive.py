"""Drives a frame decoder the way a session does and records everything it delivers.

Shared by the property tests (tests/test_frames_properties.py) and the coverage-guided fuzzer
(tests/fuzz/frames_fuzzer.py): both give the C and the pure-Python decoder the same bytes in
the same pieces, through the same entry points, and require the same record. Any exception
other than ProtocolError escapes (a crash, for both).
"""

from __future__ import annotations

import asyncio
from typing import Any

from polyrpc.errors import ProtocolError
from polyrpc.session import routing
from polyrpc.wire.frames import Implementation, Limits

# how one piece is handed over: bytes to received_data, a socket read (get_buffer, then
# received), or the plain feed() whose frames come back to the caller
MODES = ("received_data", "received", "feed")


def describe(frame: Any) -> tuple:
    """A frame as plain values (C and Python frames compare equal through this)."""
    return (
        frame.kind,
        frame.seq,
        frame.method,
        dict(frame.metadata),
        bytes(frame.payload),
        frame.codec,
        frame.flags,
    )


def drive(
    impl: Implementation,
    data: bytes,
    chunks: list[int],
    modes: list[int],
    reply_seqs: list[int],
    limits: Limits,
    loop: asyncio.AbstractEventLoop,
) -> list[tuple]:
    """Deliver ``data`` in pieces of ``chunks`` bytes (cycled) by ``modes`` (cycled, indexes
    into MODES) to a decoder routed like a session's: futures waiting for ``reply_seqs``, a
    lone-request handler, a batch handler and an error handler. Returns what happened."""
    events: list[tuple] = []
    futures = {seq: loop.create_future() for seq in reply_seqs}
    decoder = routing.for_codec(impl)(limits)

    def on_request(frame: Any) -> None:
        events.append(("request", describe(frame), decoder.serving_one))

    decoder.route(
        lambda frames: events.append(("batch", [describe(f) for f in frames])),
        lambda exc: events.append(("error", type(exc), str(exc))),
        dict(futures),
        None,
        on_request,
    )
    pos = i = 0
    while pos < len(data) and decoder.broken is None:
        n = min(max(chunks[i % len(chunks)], 1), len(data) - pos)
        mode = MODES[modes[i % len(modes)] % len(MODES)]
        i += 1
        piece = data[pos : pos + n]
        try:
            if mode == "received_data":
                decoder.received_data(piece)
            elif mode == "received":
                view = decoder.get_buffer(-1)  # as asyncio does: the view outlives the call
                n = min(n, len(view))
                view[:n] = piece[:n]
                decoder.received(n)
                del view
            else:
                events.append(("fed", [describe(f) for f in decoder.feed(piece)]))
        except ProtocolError as exc:
            events.append(("raised", str(exc)))
        pos += n
    if decoder.broken is not None:  # a broken decoder stays broken
        try:
            decoder.feed(b"PR")
        except ProtocolError as exc:
            events.append(("still broken", str(exc)))
        else:
            raise AssertionError("a broken decoder accepted more bytes")
    answered = {
        seq: describe(f.result()) if f.done() else None for seq, f in sorted(futures.items())
    }
    events.append(("end", answered, decoder.pending_bytes, decoder.bytes_received))
    return events
