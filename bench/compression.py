"""Compression libraries compared for polyrpc's payloads: speed and ratio of zstandard and lz4
on a text-like (JSON records) and a random payload of about 1 MiB, then what polyrpc's zstd
compression does to a call carrying them over loopback tcp.

Usage: python bench/compression.py [--size BYTES] [--seconds S] [--calls N]
(needs ``pip install zstandard lz4``; the ``bench`` extra installs both)

Prints two markdown tables (docs/bench/compression.md holds a run of them): compress and
decompress MB/s (of the original size, one core, best of the repeats) and the ratio
(original / compressed); and per call (the payload as a bytes argument, echoed back) the
bytes on the wire both ways and the mean round trip, with and without compression. Every
library here writes the original size into its frame, which is what the receiver checks
against its limit before decompressing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable

import lz4.frame
import zstandard

import polyrpc

MB = 1e6


def text_payload(size: int) -> bytes:
    """JSON of records like an API's: repeated keys, varied numbers and words."""
    rng = random.Random(0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    records = []
    while sum(len(r) for r in records) < size:
        record = {
            "id": rng.randrange(1 << 31),
            "name": f"{rng.choice(words)}-{rng.choice(words)}",
            "score": round(rng.random() * 1000, 3),
            "active": rng.random() < 0.5,
            "tags": rng.sample(words, 3),
        }
        records.append(json.dumps(record))
    return ("[" + ", ".join(records) + "]").encode()[:size]


def random_payload(size: int) -> bytes:
    """Incompressible bytes (already compressed or encrypted data looks like this)."""
    return random.Random(1).randbytes(size)


def candidates() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """name -> (compress, decompress) for each library and level compared."""
    zstd1 = zstandard.ZstdCompressor(level=1)
    zstd3 = zstandard.ZstdCompressor(level=3)
    unzstd = zstandard.ZstdDecompressor()
    return {
        "zstandard level 1": (zstd1.compress, unzstd.decompress),
        "zstandard level 3": (zstd3.compress, unzstd.decompress),
        "lz4.frame default": (
            lambda data: lz4.frame.compress(data, store_size=True),
            lz4.frame.decompress,
        ),
    }


def rate(func: Callable[[bytes], bytes], data: bytes, size: int, seconds: float) -> float:
    """MB/s of ``size`` original bytes for ``func(data)``: the best of several timed batches."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(5):
            func(data)
        best = min(best, (time.perf_counter() - started) / 5)
    return size / best / MB


class Echo:
    async def echo(self, data: bytes) -> bytes:
        return data


async def call_costs(data: bytes, calls: int, compression: str | None) -> tuple[float, float]:
    """(bytes on the wire per call both ways, mean seconds per call) echoing ``data``."""
    async with (
        polyrpc.serve("tcp://127.0.0.1:0", Echo()) as server,
        polyrpc.connect(server.urls[0], compression=compression) as client,
    ):
        await client.call("Echo.echo", data)  # warm up
        sent, received = client.bytes_out, client.bytes_in
        started = time.perf_counter()
        for _ in range(calls):
            await client.call("Echo.echo", data)
        elapsed = time.perf_counter() - started
        wire = client.bytes_out - sent + client.bytes_in - received
    return wire / calls, elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="payload bytes (1 MiB)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--calls", type=int, default=50, help="calls per connection row")
    options = parser.parse_args()
    payloads = {
        "text-like (JSON)": text_payload(options.size),
        "random": random_payload(options.size),
    }
    print("| payload | library | compress MB/s | decompress MB/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for payload_name, data in payloads.items():
        for name, (compress, decompress) in candidates().items():
            packed = compress(data)
            assert decompress(packed) == data
            print(
                f"| {payload_name} | {name} | {rate(compress, data, len(data), options.seconds):,.0f}"
                f" | {rate(decompress, packed, len(data), options.seconds):,.0f}"
                f" | {len(data) / len(packed):.2f} |"
            )
    print()
    print("| payload | connection | bytes on the wire per call | ms per call |")
    print("|---|---|---:|---:|")
    # a small call too: under the threshold it is not compressed, but a connection with
    # compression routes every received frame through Python (see docs/protocol.md)
    rows = [(name, data, options.calls) for name, data in payloads.items()]
    rows.append(("64 B", text_payload(64), options.calls * 100))
    for payload_name, data, calls in rows:
        for compression in (None, "zstd"):
            wire, seconds = asyncio.run(call_costs(data, calls, compression))
            label = f'compression="{compression}"' if compression else "no compression"
            print(f"| {payload_name} | {label} | {wire:,.0f} | {seconds * 1e3:.3f} |")


if __name__ == "__main__":
    main()
