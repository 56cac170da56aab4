"""atheris fuzzer: the frame decoders with the session's routing, C and pure Python, fed
arbitrary bytes.

Each input picks the limits, how the bytes are cut into reads and handed over (bytes,
socket-style reads, plain feed) and which sequence ids have callers waiting, then the rest
is the byte stream. Both decoders get exactly the same and must record exactly the same
(tests/frame_drive.py); any exception but ProtocolError, any difference, or (the C decoder
and its routing are built with AddressSanitizer by scripts/fuzz.sh) any memory error is a
crash.

Run it through scripts/fuzz.sh, which builds the instrumented C decoder and routing first.
"""

from __future__ import annotations

import asyncio
import sys

import atheris

with atheris.instrument_imports(include=["polyrpc.wire.frames", "polyrpc.session.routing"]):
    from polyrpc.session import routing
    from polyrpc.wire import frames

from tests.frame_drive import drive

if frames.ACCELERATED is None or routing.ACCELERATED is None:
    sys.exit(
        "frames_fuzzer: the C decoder or routing (polyrpc.wire._frames, _routing) did not import"
    )

LOOP = asyncio.new_event_loop()
LIMITS = [
    frames.Limits(),
    frames.Limits(max_frame=1 << 20),
    frames.Limits(max_frame=64, max_metadata=16, max_method=8),
    frames.Limits(max_frame=frames.HEADER_SIZE, max_metadata=0, max_method=0),
]


def one_input(data: bytes) -> None:
    """Decode one input with both decoders and compare what they delivered."""
    fdp = atheris.FuzzedDataProvider(data)
    limits = LIMITS[fdp.ConsumeIntInRange(0, len(LIMITS) - 1)]
    chunks = [fdp.ConsumeIntInRange(1, 300_000) for _ in range(fdp.ConsumeIntInRange(1, 4))]
    modes = [fdp.ConsumeIntInRange(0, 2) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    seqs = [fdp.ConsumeIntInRange(0, 8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    python = drive(frames.PYTHON, stream, chunks, modes, seqs, limits, LOOP)
    c = drive(frames.ACCELERATED, stream, chunks, modes, seqs, limits, LOOP)
    if python != c:
        raise AssertionError(f"the decoders differ:\npython: {python!r}\nc:      {c!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
