"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/): well-formed inputs to mutate from.

python -m tests.fuzz.make_corpus  (deterministic; the files are committed)
frames/: a few control bytes (tests/fuzz/frames_fuzzer.py) then frames of every kind.
kcp/: programs for tests/fuzz/kcp_input_fuzzer.c whose datagrams come from a real peer
engine talking to one configured like the harness's, so mutations start past the checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

from polyrpc.transports.kcp.engine import KcpEngine
from polyrpc.wire.frames import PYTHON, Kind

OUT = Path(__file__).resolve().parent / "corpus"
CONV = 0x11223344
CFG = (3 << 2) | (3 << 5) | 2  # windows of 112 segments, nodelay (see the harness)


def frames_seeds() -> dict[str, bytes]:
    def wire(*frames: tuple) -> bytes:
        out = b""
        for kind, seq, payload, kw in frames:
            out += b"".join(bytes(b) for b in PYTHON.encode_frame(kind, seq, payload, **kw))
        return out

    control = bytes([0, 1, 0, 0x40, 0, 1, 2, 2, 1, 3])
    return {
        "hello": control
        + wire((Kind.HELLO, 0, b"", {"metadata": {"codecs": "msgpack", "max_frame": "65536"}})),
        "call_reply": control
        + wire(
            (Kind.REQUEST, 1, b"\x92\x91\x01\x80", {"method": "Demo.add", "codec": 1}),
            (Kind.RESPONSE, 1, b"\x02", {"codec": 1}),
            (Kind.ERROR, 3, b"boom", {"metadata": {"code": "handler_error"}}),
        ),
        "stream": control
        + wire(
            (Kind.REQUEST, 5, b"", {"method": "S.items", "flags": 2}),
            (Kind.STREAM_ITEM, 5, b"x" * 300, {}),
            (Kind.CREDIT, 5, b"", {"metadata": {"credit": "8"}}),
            (Kind.STREAM_END, 5, b"", {}),
            (Kind.CANCEL, 7, b"", {}),
            (Kind.HEARTBEAT, 0, b"", {"flags": 1}),
            (Kind.GOAWAY, 0, b"", {"metadata": {"reason": "bye"}}),
        ),
    }


def kcp_seeds() -> dict[str, bytes]:
    def program(message_sizes: list[int], stream: bool) -> bytes:
        ours = KcpEngine(
            CONV, sndwnd=112, rcvwnd=112, nodelay=1, interval=10, resend=2, nocwnd=1, stream=stream
        )
        peer = KcpEngine(
            CONV, sndwnd=112, rcvwnd=112, nodelay=1, interval=10, resend=2, nocwnd=1, stream=stream
        )
        out = struct.pack("<H", CFG | int(stream))
        ping = b"ping" * 10
        out += bytes([3]) + struct.pack("<H", len(ping) << 1) + ping  # send
        ours.send(ping)
        out += bytes([4, 0, 0])  # flush at the same time
        ours.flush(1000)
        out += bytes([6])  # take the output (it goes to the peer)
        for datagram in ours.take_output():
            peer.input(datagram, 1005)
        for size in message_sizes:
            peer.send(bytes(range(256)) * (size // 256) + bytes(size % 256))
        peer.flush(1005)
        for datagram in peer.take_output():
            out += bytes([0]) + struct.pack("<H", len(datagram)) + datagram
        out += bytes([5, 0xFF, 0xFF])  # receive all
        out += bytes([4, 10, 0, 7, 6])  # later: flush, timers, output
        return out

    return {
        "small": program([5], False),
        "fragments": program([3000, 1], False),
        "stream": program([2000, 100], True),
    }


def main() -> None:
    for name, seeds in (("frames", frames_seeds()), ("kcp", kcp_seeds())):
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        for seed, data in seeds.items():
            (folder / seed).write_bytes(data)


if __name__ == "__main__":
    main()
