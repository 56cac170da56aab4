"""What a peer can cost a server: memory per handshaking and per idle connection, per pre-auth
partial frame, per announced-but-unsent payload, and the decode amplification of hostile payloads.

Usage: python bench/budgets.py [--transport tcp|tls|quic|...] [--connections N]
       [--handshaking N] [--loop asyncio] [--pure-python] [--connections-only] [--decode-only]
(POLYRPC_PURE_PYTHON=1 in the environment: the decode numbers of the pure-Python scans)

The per-connection numbers work for any transport; the raw-frame and decode numbers are
measured over tcp (they are the session's, the same on every transport).

Each server-side number is measured against a real ``polyrpc serve --demo`` subprocess (its
VmRSS from /proc before and after; the clients live in this process, so the server's RSS
holds only what the peers cost it). The functions return numbers so tests and other
benchmarks can assert bounds on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack

import polyrpc
from polyrpc.session.session import FEATURES
from polyrpc.stream.registry import registry
from polyrpc.stream.trait import DISCARD, Stream
from polyrpc.wire.codecs import codec_by_name
from polyrpc.wire.frames import HEADER, MAGIC, VERSION, Kind, encode_frame

MiB = 1 << 20


def rss(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_fd_limit(wanted: int) -> None:
    """Allow this process ``wanted`` open files (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


_SERVE = (
    "import resource, sys; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)); "
    "from polyrpc.cli import main; sys.exit(main(sys.argv[1:]))"
)


@contextlib.contextmanager
def serve_demo(
    schemes: Sequence[str],
    pure_python: bool = False,
    objects: Sequence[str] = (),
    loop: str = "",
) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """A ``polyrpc serve URL... --demo [--object MODULE:OBJECT...]`` subprocess listening on
    each transport in ``schemes`` (loopback, with the C or the pure-Python decoder), and the
    URL a client dials for each (with the transport's certificate options); ``loop="asyncio"``
    keeps it off uvloop."""
    env = {**os.environ, "POLYRPC_PURE_PYTHON": "1" if pure_python else "", "POLYRPC_LOOP": loop}
    extra = [arg for spec in objects for arg in ("--object", spec)]
    with (
        tempfile.TemporaryDirectory(prefix="budgets") as workdir,
        tempfile.TemporaryFile("w+") as log,
    ):  # the refused peers' log lines, read if the server fails to start
        transports = [registry.get(scheme) for scheme in schemes]
        loopback = [t.loopback_urls(Path(workdir)) for t in transports]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SERVE,
                "serve",
                *(url for url, _ in loopback),
                "--demo",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            bound: list[str] = []
            while len(bound) < len(schemes):  # one "serving on URL" line per listener
                line = proc.stdout.readline()
                if not line:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-2000:]}")
                if line.startswith("serving on "):
                    bound.append(line.split()[-1])
            urls = {
                scheme: str(transport.parse(url).with_options(**options))
                for scheme, transport, url, (_, options) in zip(
                    schemes, transports, bound, loopback, strict=True
                )
            }
            yield proc, urls
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def demo_server(
    pure_python: bool = False, scheme: str = "tcp", loop: str = ""
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ``polyrpc serve SCHEME@127.0.0.1:0 --demo`` subprocess and the URL clients dial."""
    with serve_demo([scheme], pure_python, loop=loop) as (proc, urls):
        yield proc, urls[scheme]


def _settled_rss(pid: int, wait: float = 1.0) -> int:
    time.sleep(wait)
    return rss(pid)


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("@", 1)[1].rsplit(":", 1)
    return host, int(port)


def idle_connection_cost(
    connections: int = 1000, pure_python: bool = False, scheme: str = "tcp", loop: str = ""
) -> float:
    """Server RSS bytes per idle authenticated connection (after one call each)."""
    raise_fd_limit(connections + 100)

    async def measure(pid: int, url: str) -> float:
        before = _settled_rss(pid)
        clients = []
        try:
            for _ in range(connections):
                client = await polyrpc.connect(url)
                clients.append(client)
                await client.call("Demo.echo", b"x" * 64)
            await asyncio.sleep(1.0)
            after = rss(pid)
        finally:
            for client in clients:
                client.abort()
        return (after - before) / connections

    with demo_server(pure_python, scheme, loop) as (proc, url):
        return asyncio.run(measure(proc.pid, url))


def handshaking_connection_cost(
    connections: int = 100, scheme: str = "tcp", loop: str = ""
) -> float:
    """Server RSS bytes per connection that finished the transport's handshake (TCP accept,
    TLS, QUIC) but never sends HELLO. Keep ``connections`` under the server's
    ``max_handshaking`` (128): those over it are refused and closed."""
    raise_fd_limit(connections + 100)

    async def measure(pid: int, url: str) -> float:
        transport, address = registry.resolve(url)
        before = _settled_rss(pid)
        streams: list[Stream] = []
        try:
            for _ in range(connections):
                stream = await transport.dial(address)
                stream.set_receiver(DISCARD)
                streams.append(stream)
            await asyncio.sleep(1.0)  # well inside the server's 10 s handshake timeout
            after = rss(pid)
        finally:
            for stream in streams:
                stream.abort()
        return (after - before) / connections

    with demo_server(scheme=scheme, loop=loop) as (proc, url):
        return asyncio.run(measure(proc.pid, url))


def hello() -> bytes:
    """A client HELLO frame as a raw peer sends it (the demo needs no token)."""
    meta = {"version": str(VERSION), "codec": "msgpack", "features": FEATURES}
    return b"".join(bytes(b) for b in encode_frame(Kind.HELLO, 0, metadata=meta))


def header(payload_size: int) -> bytes:
    """The header of a one-way frame announcing ``payload_size`` payload bytes."""
    return HEADER.pack(MAGIC, VERSION, Kind.ONEWAY, 0, 0, 0, 1, 0, payload_size)


def _raw_peers(
    url: str, count: int, data: bytes, handshake: bool
) -> tuple[list[socket.socket], int]:
    """``count`` raw sockets that (optionally complete the handshake and) send ``data``;
    returns them and how many the server has closed so far."""
    peers = []
    for _ in range(count):
        sock = socket.create_connection(_address(url))
        if handshake:
            sock.sendall(hello())
            sock.settimeout(5)
            sock.recv(4096)  # the HELLO reply
        sock.sendall(data)
        peers.append(sock)
    time.sleep(1.0)
    closed = 0
    for sock in peers:
        sock.setblocking(False)
        try:
            while sock.recv(65536):  # an ERROR frame may come before the close
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return peers, closed


def partial_frame_cost(
    peers: int = 8,
    announced: int = 64 * MiB - 64,
    sent: int = 1,
    handshake: bool = False,
    pure_python: bool = False,
) -> dict[str, float]:
    """Server RSS growth when ``peers`` raw peers each announce a frame of ``announced``
    payload bytes and send ``sent`` of them (before or after the HELLO exchange)."""
    with demo_server(pure_python) as (proc, url):
        before = _settled_rss(proc.pid)
        socks, closed = _raw_peers(url, peers, header(announced) + bytes(sent), handshake)
        try:
            after = _settled_rss(proc.pid, 0.5)
        finally:
            for sock in socks:
                sock.close()
    return {"bytes": after - before, "closed": closed}


AMPLIFIERS: dict[str, Callable[[int], bytes]] = {
    "msgpack empty maps": lambda n: msgpack.packb([{}] * n),
    "msgpack {0: 0}": lambda n: msgpack.packb([{0: 0}] * (n // 3)),
    "msgpack empty arrays": lambda n: msgpack.packb([[]] * n),
    "msgpack pairs": lambda n: msgpack.packb([[1, 2]] * (n // 3)),
    "msgpack maps every 3rd byte": lambda n: msgpack.packb([{}, 0, 0] * (n // 3)),
    "msgpack 2-char strings": lambda n: msgpack.packb(["ab"] * (n // 3)),
    "msgpack small ints": lambda n: msgpack.packb([1] * n),
    "msgpack nested": lambda n: b"\x91" * 2000 + b"\xc0",
    "json empty arrays": lambda n: ("[" + ",".join(["[]"] * (n // 3)) + "]").encode(),
    "json empty maps": lambda n: ("[" + ",".join(["{}"] * (n // 3)) + "]").encode(),
    'json {"a":1}': lambda n: ("[" + ",".join(['{"a":1}'] * (n // 8)) + "]").encode(),
    "json nested": lambda n: b"[" * 100_000,
}
"""Hostile payloads of about n bytes (the msgpack ones at the densest it allows)."""

_RECORDS = [{"id": i, "name": "bob", "ok": True, "score": i / 7} for i in range(10_000)]
ORDINARY: dict[str, Callable[[int], bytes]] = {
    "msgpack 1 MiB bytes": lambda n: msgpack.packb(b"x" * MiB),
    "msgpack 1 MiB str": lambda n: msgpack.packb("x" * MiB),
    "msgpack 10k small dicts": lambda n: msgpack.packb(_RECORDS),
    "json 1 MiB str": lambda n: json.dumps("x" * MiB).encode(),
    "json 10k small dicts": lambda n: json.dumps(_RECORDS).encode(),
}
"""Everyday payloads, to check that bounding costs them (next to) nothing."""


def decode_amplification(
    size: int = 3 * MiB, runs: int = 5, payloads: dict[str, Callable[[int], bytes]] | None = None
) -> dict[str, dict[str, Any]]:
    """For each payload of about ``size`` bytes (default: AMPLIFIERS then ORDINARY): peak
    bytes allocated while decoding per payload byte, the median milliseconds per MiB of
    ``runs`` decodes, and the error if it was refused."""
    results: dict[str, dict[str, Any]] = {}
    for name, make in (payloads or AMPLIFIERS | ORDINARY).items():
        payload = make(size)
        codec = codec_by_name(name.split()[0])
        error = None
        times = []
        for _ in range(runs):
            gc.collect()
            started = time.perf_counter()
            try:
                codec.decode(payload)
            except polyrpc.ProtocolError as exc:
                error = type(exc).__name__
            times.append(time.perf_counter() - started)
        gc.collect()
        tracemalloc.start()
        with contextlib.suppress(polyrpc.ProtocolError):
            codec.decode(payload)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[name] = {
            "bytes": len(payload),
            "factor": round(peak / len(payload), 1),
            "ms_per_mib": round(statistics.median(times) * 1000 / (len(payload) / MiB), 2),
            "refused": error,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", default="tcp", choices=registry.schemes())
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--handshaking", type=int, default=100, help="pre-HELLO connections (< 128)"
    )
    parser.add_argument("--pure-python", action="store_true")
    parser.add_argument(
        "--loop",
        choices=["asyncio", ""],
        default="",
        help="the server's loop (default: uvloop if installed)",
    )
    parser.add_argument(
        "--connections-only", action="store_true", help="skip the tcp frame and decode numbers"
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="only the decode amplification and times"
    )
    args = parser.parse_args()
    if args.decode_only:
        print(json.dumps(decode_amplification(), indent=2))
        return
    pure, scheme, loop = args.pure_python, args.transport, args.loop
    report: dict[str, Any] = {
        "transport": scheme,
        "server_loop": loop or "default",
        "handshaking_connection_bytes": round(
            handshaking_connection_cost(args.handshaking, scheme, loop)
        ),
        "idle_connection_bytes": round(idle_connection_cost(args.connections, pure, scheme, loop)),
    }
    if not args.connections_only:
        report |= {
            "preauth_64MiB_headers_x8": partial_frame_cost(pure_python=pure),
            "preauth_16KiB_frames_x8": partial_frame_cost(
                announced=16000, sent=8000, pure_python=pure
            ),
            "postauth_64MiB_headers_x8": partial_frame_cost(handshake=True, pure_python=pure),
            "postauth_64MiB_headers_1MiB_sent_x8": partial_frame_cost(
                sent=MiB, handshake=True, pure_python=pure
            ),
            "decode": decode_amplification(),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
