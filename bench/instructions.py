"""Instructions per round trip, counted by valgrind in each process: a noise-free cost measure.

Usage: python bench/instructions.py [ROW ...] [--calls N] [--in-flight K]
(default rows: raw-asyncio tcp tcp/rpc)

Wall-clock latency on a shared machine moves with the neighbours' load; the number of
user-space instructions a process executes per round trip does not. For each row this
runs the bench's echo server and a client doing N and then 3N one-call-in-flight round
trips (64-byte payload), once with the client and once with the server under
``valgrind --tool=callgrind``, and divides the difference by 2N, so start-up and
connection setup cancel out. With ``--in-flight K`` each round trip is K calls started
together (the bench's rate workload has 128), and the count is per call: the batching
paths, which one call in flight never takes. Kernel time (the loopback, the wake-ups) is not counted:
it is about the same for every row. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

from polyrpc.bench.rows import resolve_target
from polyrpc.session.runtime import run

PAYLOAD = b"x" * 64
VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]


async def _client(row: str, info: str, rounds: int, in_flight: int) -> None:
    client = await resolve_target(row).connect(info)
    if in_flight == 1:
        for _ in range(rounds):
            await client.echo(PAYLOAD)
    else:
        for _ in range(rounds):
            await asyncio.gather(*[client.echo(PAYLOAD) for _ in range(in_flight)])
    await client.close()


def _count(row: str, side: str, rounds: int, in_flight: int) -> int:
    """Instructions the ``side`` process executed in a run of ``rounds`` round trips."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
    server_cmd = [sys.executable, "-m", "polyrpc.bench.worker", "serve", row]
    client_cmd = [sys.executable, __file__, "--client", row, "", str(rounds), str(in_flight)]
    server = subprocess.Popen(
        (VALGRIND if side == "server" else []) + server_cmd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    client_cmd[-3] = server.stdout.readline().strip()
    client = subprocess.run(
        (VALGRIND if side == "client" else []) + client_cmd, env=env, capture_output=True, text=True
    )
    _, server_err = server.communicate(input="")
    if client.returncode != 0:
        raise RuntimeError(f"{row} client failed: {client.stderr.strip()[-500:]}")
    report = client.stderr if side == "client" else server_err
    found = re.search(r"Collected : (\d+)", report)
    if found is None:
        raise RuntimeError(f"no callgrind total for the {row} {side}: {report.strip()[-500:]}")
    return int(found.group(1))


def per_call(row: str, rounds: int, in_flight: int = 1) -> tuple[float, float]:
    """(client, server) instructions per call: per round trip when ``in_flight`` is 1."""
    calls = 2 * rounds * in_flight
    client = _count(row, "client", 3 * rounds, in_flight) - _count(row, "client", rounds, in_flight)
    server = _count(row, "server", 3 * rounds, in_flight) - _count(row, "server", rounds, in_flight)
    return client / calls, server / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", default=["raw-asyncio", "tcp", "tcp/rpc"])
    parser.add_argument("--calls", type=int, default=300, help="N (the runs do N and 3N)")
    parser.add_argument(
        "--in-flight", type=int, default=1, help="K calls started together per round trip"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind: apt-get install valgrind")
    first = None
    unit = "round trip" if args.in_flight == 1 else f"call ({args.in_flight} in flight)"
    for row in args.rows:
        client, server = per_call(row, args.calls, args.in_flight)
        total = client + server
        first = first or total
        print(
            f"{row:14} client {client:8,.0f}  server {server:8,.0f}  "
            f"total {total:8,.0f} instructions per {unit}  ({total / first:.2f}x {args.rows[0]})"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        run(_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    else:
        main()
