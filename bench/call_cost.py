"""CPU cost of one call, client and server in one process: the RPC API against the message API.

Usage: python bench/call_cost.py [URL] [--rounds N]

Both sides share one event loop (uvloop when installed), so the process CPU time
per call is the whole per-call cost of polyrpc (client + server + the kernel's
loopback work), without the cross-process wake-ups that make wall-clock numbers
on a shared machine noisy. Prints the best of 5 repeats for each API.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import polyrpc
from polyrpc.session.runtime import loop_name, run

IN_FLIGHT = 128
PAYLOAD = b"x" * 64


class Echo:
    async def echo(self, payload: bytes) -> bytes:
        return payload


async def _cpu_per_call(one_call, rounds: int) -> float:
    async def loop(count: int) -> None:
        for _ in range(count):
            await one_call(PAYLOAD)

    await asyncio.gather(*(loop(20) for _ in range(IN_FLIGHT)))  # warm up
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        await asyncio.gather(*(loop(rounds) for _ in range(IN_FLIGHT)))
        best = min(best, (time.process_time() - started) / (IN_FLIGHT * rounds))
    return best * 1e6


async def main(url: str, rounds: int) -> None:
    async with (
        polyrpc.serve(url, Echo()) as server,
        polyrpc.connect(server.urls[0], max_in_flight=1024) as client,
    ):
        rpc = await _cpu_per_call(lambda p: client.call("Echo.echo", p), rounds)
    listener = await polyrpc.listen(url, on_request=lambda message: message)
    try:
        connection = await polyrpc.dial(listener.url, max_in_flight=1024)
        message = await _cpu_per_call(connection.request, rounds)
        await connection.close()
    finally:
        await listener.close()
    print(f"{url} on {loop_name()}, {IN_FLIGHT} in flight, {len(PAYLOAD)}-byte payload:")
    print(f"  client.call (RPC API)        {rpc:5.2f} µs CPU per call")
    print(f"  connection.request (message) {message:5.2f} µs CPU per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="tcp@127.0.0.1:0")
    parser.add_argument("--rounds", type=int, default=300, help="calls per loop per repeat")
    args = parser.parse_args()
    run(main(args.url, args.rounds))
