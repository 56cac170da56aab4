"""One benchmark process: the server half or the client half of a row.

``python -m polyrpc.bench.worker serve ROW`` prints the connect info, then serves
until its stdin closes; ``... client ROW INFO PAYLOAD IN_FLIGHT SECONDS [echo|stream]``
runs one workload and prints its measurements as JSON; ``... relay NETWORK LISTEN_HOST
TARGET IMPAIRMENT_JSON`` relays to TARGET through an impaired path, prints its own
endpoint and runs until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..session.runtime import run
from .impair import Impairment, run_relay
from .rows import resolve_target

WARMUP_SECONDS = 0.2


async def serve(row: str) -> None:
    target = resolve_target(row)
    with tempfile.TemporaryDirectory(prefix="prpcbench") as workdir:
        info, stop = await target.serve(Path(workdir))
        print(info, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the runner closes our stdin
        await stop()


async def relay(network: str, listen_host: str, target: str, impairment: Impairment) -> None:
    with tempfile.TemporaryDirectory(prefix="prpcrelay") as workdir:
        address, stack = await run_relay(network, listen_host, target, impairment, Path(workdir))
        async with stack:
            print(address, flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)


async def measure(row: str, info: str, payload_bytes: int, in_flight: int, seconds: float) -> dict:
    """Run ``in_flight`` concurrent echo loops for ``seconds``; return latency and throughput."""
    target = resolve_target(row)
    client = await target.connect(info)
    payload = os.urandom(payload_bytes)
    latencies: list[int] = []
    record = False
    stop_at = 0.0

    async def loop_echo() -> None:
        clock = time.perf_counter_ns
        while time.perf_counter() < stop_at:
            started = clock()
            reply = await client.echo(payload)
            if record:
                latencies.append(clock() - started)
            if len(reply) != payload_bytes:
                raise RuntimeError(f"echo returned {len(reply)} bytes, sent {payload_bytes}")

    stop_at = time.perf_counter() + WARMUP_SECONDS
    await asyncio.gather(*(loop_echo() for _ in range(in_flight)))
    assert await client.echo(payload) == payload, "echo corrupted the payload"
    record = True
    began = time.perf_counter()
    stop_at = began + seconds
    await asyncio.gather(*(loop_echo() for _ in range(in_flight)))
    elapsed = time.perf_counter() - began
    await client.close()
    latencies.sort()
    count = len(latencies)

    def percentile(p: float) -> float:
        return latencies[min(count - 1, int(p * count))] / 1000 if count else float("nan")

    return {
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        "requests_per_s": count / elapsed,
        "mb_per_s": count * payload_bytes / elapsed / 1e6,
        "count": count,
    }


async def measure_stream(row: str, info: str, payload_bytes: int, seconds: float) -> dict:
    """Push one-way messages back to back for ``seconds``; return what the server confirms.

    The clock stops when the server has counted every byte pushed, so the rate is what
    arrived, not what was queued; a count that differs from what was pushed is an error.
    """
    if payload_bytes < 1:
        raise ValueError("the stream workload needs a payload of at least one byte")
    target = resolve_target(row)
    client = await target.connect(info)
    payload = os.urandom(payload_bytes)

    async def push_until(deadline: float) -> int:
        pushed = 0
        while time.perf_counter() < deadline:
            await client.push(payload)
            pushed += 1
        return pushed

    await push_until(time.perf_counter() + WARMUP_SECONDS)
    before = await client.received()
    began = time.perf_counter()
    pushed = await push_until(began + seconds)
    after = await client.received()
    elapsed = time.perf_counter() - began
    await client.close()
    if after - before != pushed * payload_bytes:
        raise RuntimeError(
            f"the server counted {after - before} bytes, {pushed * payload_bytes} were pushed"
        )
    return {"requests_per_s": pushed / elapsed, "mb_per_s": pushed * payload_bytes / elapsed / 1e6}


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        run(serve(argv[1]))
        return 0
    if argv[0] == "client":
        row, info, payload, in_flight, seconds = argv[1:6]
        if argv[6:7] == ["stream"]:
            result = run(measure_stream(row, info, int(payload), float(seconds)))
        else:
            result = run(measure(row, info, int(payload), int(in_flight), float(seconds)))
        print(json.dumps(result), flush=True)
        return 0
    if argv[0] == "relay":
        network, listen_host, target, spec = argv[1:5]
        # the stdlib loop never fires a timer early (uvloop rounds to whole milliseconds),
        # so the relay's delays are never shorter than asked
        asyncio.run(relay(network, listen_host, target, Impairment(**json.loads(spec))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
