"""The ``polyrpc`` command: list transports, benchmark them (and serve/call services)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import PolyrpcError
from .stream.address import split_scheme
from .stream.registry import registry


def cmd_transports(args: argparse.Namespace) -> int:
    """Print every scheme, whether it works here and, if not, why and how to fix it."""
    console = Console()
    for row in registry.describe():
        if row.usable:
            console.print(f"[green]✔[/] {row.scheme:<6} {row.description} ({row.source})")
        else:
            console.print(f"[red]✘[/] {row.scheme:<6} unavailable: {row.reason} ({row.source})")
    return 0


def _bench_list(text: str | None, parse: Any, option: str) -> list[Any]:
    if not text:
        return []
    try:
        return [parse(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise SystemExit(f"polyrpc bench: {option}: {exc}") from None


def _bench_path(args: argparse.Namespace, console: Console) -> Any:
    """The network path every row goes through: loopback, a relay, or netem on a veth pair."""
    from .bench.impair import (
        Impairment,
        netem_unavailable_reason,
        parse_duration,
        parse_loss,
        parse_rate,
    )
    from .bench.runner import NetworkPath

    try:
        impairment = Impairment(
            loss=parse_loss(args.loss) if args.loss else 0.0,
            delay=parse_duration(args.delay) if args.delay else 0.0,
            jitter=parse_duration(args.jitter) if args.jitter else 0.0,
            rate=parse_rate(args.rate) if args.rate else 0.0,
        )
    except ValueError as exc:
        raise SystemExit(f"polyrpc bench: {exc}") from None
    if not impairment.active:
        return NetworkPath()
    mode = args.impair_with
    if mode in ("auto", "netem"):
        reason = netem_unavailable_reason()
        if reason and mode == "netem":
            raise SystemExit(f"polyrpc bench: --impair-with netem: {reason}")
        if reason:
            console.print(f"[yellow]netem unavailable ({reason}): using user-space relays")
        mode = "relay" if reason else "netem"
    if mode == "relay":
        console.print(
            f"[bold]impaired path ({impairment.describe()}) by user-space relays: udp rows "
            "through a UDP relay with loss; tcp and unix rows through a stream relay that "
            "delays and rate-limits but [red]cannot drop packets: tcp rows are not lossy"
        )
    return NetworkPath(impairment, mode)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the cross-transport benchmark and print (and optionally save and plot) the results."""
    from .bench.impair import NetemPath
    from .bench.rows import default_rows, resolve_target
    from .bench.runner import (
        DEFAULT_MAX_IN_FLIGHT_BYTES,
        WORKLOADS,
        machine,
        parse_size,
        plan,
        render,
        run_bench,
        write_json,
    )

    console = Console(stderr=False, width=None if sys.stdout.isatty() else 150)
    rows = args.transports.split(",") if args.transports else default_rows()
    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(
                f"polyrpc bench: unknown workload {name!r}; valid: {', '.join(WORKLOADS)}, none"
            )
    sizes = _bench_list(args.sizes, parse_size, "--sizes")
    in_flight = _bench_list(args.in_flight, int, "--in-flight")
    if in_flight and min(in_flight) < 1:
        raise SystemExit("polyrpc bench: --in-flight values must be >= 1")
    if sizes or in_flight:
        sizes, in_flight = sizes or [64], in_flight or [1]
    points = plan(workloads, sizes, in_flight)
    if not points:
        raise SystemExit("polyrpc bench: nothing to measure (no workloads and no sweep)")
    max_bytes = (
        parse_size(args.max_in_flight_bytes)
        if args.max_in_flight_bytes
        else DEFAULT_MAX_IN_FLIGHT_BYTES
    )
    for row in rows:
        try:
            reason = resolve_target(row).unavailable_reason()
        except ValueError as exc:
            raise SystemExit(f"polyrpc bench: {exc}") from None
        if reason:
            raise SystemExit(f"polyrpc bench: {row} cannot run here: {reason}")
    if args.repeat < 1 or args.seconds <= 0:
        raise SystemExit("polyrpc bench: --repeat must be >= 1 and --seconds > 0")
    if args.compare and not Path(args.compare).is_file():
        raise SystemExit(f"polyrpc bench: --compare: no such file {args.compare}")
    if args.plot:
        from .bench.plot import require_matplotlib

        require_matplotlib()
    path = _bench_path(args, console)
    machine_info = machine()
    console.print(
        f"rows: {', '.join(rows)}; points: {', '.join(p.name for p in points)}; "
        f"{args.seconds:g}s each, {args.repeat} repeat(s); "
        f"{machine_info['cpus']} CPUs, load {machine_info['load_avg'][0]:.2f}"
    )
    if path.mode == "netem":
        with NetemPath(path.impairment) as netem:
            path.netem = netem
            results = run_bench(rows, points, args.seconds, args.repeat, console, path, max_bytes)
    else:
        results = run_bench(rows, points, args.seconds, args.repeat, console, path, max_bytes)
    machine_info["load_avg_end"] = list(os.getloadavg())
    render(results, console)
    settings = {
        "rows": rows,
        "workloads": workloads,
        "sizes": sizes,
        "in_flight": in_flight,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "max_in_flight_bytes": max_bytes,
        "impairment": {**path.impairment.as_dict(), "mode": path.mode},
        "unavailable": {row.scheme: row.reason for row in registry.describe() if not row.usable},
        "command": " ".join(["polyrpc", *sys.argv[1:]]),
    }
    if args.json:
        write_json(Path(args.json), results, settings, machine_info)
        console.print(f"wrote {args.json}")
    if args.plot:
        from .bench.plot import plot

        plot(results, Path(args.plot), machine_info, settings)
        console.print(f"wrote {args.plot}")
    if args.compare:
        from .bench.compare import compare, load

        compare(load(Path(args.compare)), results, console)
    return 1 if any("error" in r for r in results) else 0


def _load_object(spec: str) -> Any:
    """Import ``module:attribute`` (an object, a class to instantiate, or a function)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"polyrpc serve: expected module:object, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"polyrpc serve: cannot load {spec!r}: {exc}") from None
    return obj() if isinstance(obj, type) else obj


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the demo service or the user's object until Ctrl-C, then shut down gracefully."""
    from .cluster.server import RegisteredServer
    from .session.runtime import run

    if not args.demo and not args.objects:
        raise SystemExit("polyrpc serve: give module:object to serve, or --demo")
    services: list[Any] = [_load_object(spec) for spec in args.objects]
    if args.demo:
        from .demo import Demo

        services.append(Demo())

    if args.workers > 1:
        return _serve_with_workers(args)

    async def main() -> int:
        server = RegisteredServer(
            token=args.token,
            sync_workers=args.sync_workers,
            sync_queue=args.sync_queue,
            worker=args.worker_id,
        )
        for service in services:
            server.register(service)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: loop.create_task(server.close()))
        if args.worker_id is not None:
            _stop_with_supervisor(server)
        with tempfile.TemporaryDirectory(prefix="polyrpc-dev-") as workdir:
            try:
                for url in args.urls:
                    transport, _ = registry.resolve(url)
                    url, fingerprint = transport.development_listen_url(url, Path(workdir))
                    bound = await server.start(url)
                    print(f"serving on {bound}", flush=True)
                    if fingerprint:
                        print(
                            f"  self-signed development certificate, SHA-256 {fingerprint}\n"
                            f"  clients: {bound}?fingerprint={fingerprint}",
                            flush=True,
                        )
                if args.register:
                    instance = await server.register_at(args.register, args.ttl)
                    print(f"registered at {args.register} as {instance.id}", flush=True)
            except PolyrpcError as exc:
                await server.close()
                print(f"polyrpc serve: {exc}", file=sys.stderr)
                return 1
            print(
                "methods: "
                + ", ".join(m for m in server.services.methods if not m.startswith("_sys")),
                flush=True,
            )
            await server.serve_forever()
        print("stopped", flush=True)
        return 0

    return run(main())


def _stop_with_supervisor(server: Any) -> None:
    """A worker drains and exits when its supervisor is gone (its stdin, a pipe from the
    supervisor, ends), even when the supervisor was killed and could not tell it."""
    loop = asyncio.get_running_loop()
    stdin = sys.stdin.fileno()
    closing: list[asyncio.Task[None]] = []

    def supervisor_said() -> None:
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            closing.append(loop.create_task(server.close()))

    loop.add_reader(stdin, supervisor_said)


def _serve_with_workers(args: argparse.Namespace) -> int:
    """``serve --workers N``: a supervisor runs N ``polyrpc serve`` workers on shared ports."""
    from .session.runtime import run
    from .workers import Supervisor, shareable_urls

    serve_args = [f"--object={spec}" for spec in args.objects]
    if args.demo:
        serve_args.append("--demo")
    if args.token is not None:
        serve_args.append(f"--token={args.token}")
    serve_args += [f"--sync-workers={args.sync_workers}", f"--sync-queue={args.sync_queue}"]
    with tempfile.TemporaryDirectory(prefix="polyrpc-dev-") as workdir:
        urls = []
        try:
            for url in args.urls:
                transport, _ = registry.resolve(url)
                url, fingerprint = transport.development_listen_url(url, Path(workdir))
                if fingerprint:
                    print(
                        f"  {url.partition('?')[0]}: self-signed development certificate, "
                        f"SHA-256 {fingerprint} (clients add ?fingerprint={fingerprint})",
                        flush=True,
                    )
                urls.append(url)
            shared, held = shareable_urls(urls)
        except (PolyrpcError, OSError) as exc:
            print(f"polyrpc serve: {exc}", file=sys.stderr)
            return 1
        register = (args.register, args.ttl) if args.register else None
        return run(Supervisor(shared, serve_args, args.workers, held, register).run())


def _parse_argument(text: str) -> Any:
    """A JSON literal if it parses as one, else the plain word as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    """Call one method and print its JSON result (one line per item with --stream); the URL
    may name a whole service (``etcd://127.0.0.1:2379/arith``, ``list://...``)."""
    from . import connect
    from .session.runtime import run

    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for text in args.args:
        name, sep, value = text.partition("=")
        if sep and name.isidentifier() and not text.startswith(("{", "[", '"')):
            keywords[name] = _parse_argument(value)
        else:
            positional.append(_parse_argument(text))

    async def main() -> None:
        async with connect(args.url, token=args.token, timeout=args.timeout) as client:
            if args.stream:
                async for item in client.stream(
                    args.method, *positional, timeout=args.timeout, **keywords
                ):
                    print(json.dumps(item, default=_jsonable), flush=True)
            else:
                result = await client.call(
                    args.method, *positional, timeout=args.timeout, **keywords
                )
                print(json.dumps(result, default=_jsonable))

    try:
        run(main())
    except PolyrpcError as exc:
        print(f"polyrpc call: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as exc:
        print(f"polyrpc call: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _worker_count(text: str) -> int:
    from .workers import worker_count

    try:
        return worker_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyrpc", description="Messages and remote calls over a transport chosen by URL."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    transports = sub.add_parser("transports", help="list transports and whether they work here")
    transports.set_defaults(func=cmd_transports)
    bench = sub.add_parser("bench", help="benchmark every usable transport on loopback")
    bench.add_argument(
        "--transports", help="comma-separated rows (default: all usable + references)"
    )
    bench.add_argument(
        "--workloads",
        default="latency,rate,bulk",
        help="named points: latency (64 B, 1 in flight), rate (64 B, 128), bulk (1M, 4), "
        "stream (1M one-way messages back to back, not in the default); 'none' for a sweep only",
    )
    bench.add_argument("--sizes", help="sweep payload sizes, e.g. 64,1K,64K,1M,16M")
    bench.add_argument("--in-flight", help="sweep calls in flight, e.g. 1,16,128")
    bench.add_argument(
        "--max-in-flight-bytes",
        help="skip (and say so) sweep points with more bytes in flight (default 256M)",
    )
    bench.add_argument("--loss", help="impaired path: packet loss per direction, e.g. 1%%")
    bench.add_argument("--delay", help="impaired path: one-way delay, e.g. 20ms")
    bench.add_argument("--jitter", help="impaired path: delay jitter, e.g. 5ms")
    bench.add_argument("--rate", help="impaired path: link rate, e.g. 100mbit")
    bench.add_argument(
        "--impair-with",
        choices=("auto", "netem", "relay"),
        default="auto",
        help="netem on a veth pair (root, kernel netem) or user-space relays; auto picks netem "
        "when it works",
    )
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    bench.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot the results (matplotlib)")
    bench.add_argument("--compare", metavar="OLD.json", help="show the change from an earlier run")
    bench.set_defaults(func=cmd_bench)
    serve = sub.add_parser("serve", help="serve services on one or more URLs until Ctrl-C")
    serve.add_argument("urls", nargs="+", metavar="URL", help="e.g. tcp@127.0.0.1:9000")
    serve.add_argument("--demo", action="store_true", help="serve the built-in Demo service")
    serve.add_argument(
        "--object",
        dest="objects",
        action="append",
        default=[],
        metavar="MODULE:OBJECT",
        help="serve this object (repeatable); also accepted positionally after the URLs",
    )
    serve.add_argument("--token", help="require this shared token from clients")
    serve.add_argument(
        "--sync-workers", type=int, default=32, help="threads for sync handlers (default 32)"
    )
    serve.add_argument(
        "--sync-queue",
        type=int,
        default=1024,
        help="sync calls that may wait for a thread; more are refused as overloaded (1024)",
    )
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="worker processes sharing the URLs (SO_REUSEPORT; unix: one inherited socket); "
        "'auto': one per CPU (default 1)",
    )
    serve.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)
    serve.add_argument(
        "--register",
        metavar="DISCOVERY_URL",
        help="register the URLs served under a name, e.g. etcd://127.0.0.1:2379/arith",
    )
    serve.add_argument(
        "--ttl", type=float, default=5.0, help="the registration's lease in seconds (5)"
    )
    serve.set_defaults(func=cmd_serve)
    call = sub.add_parser("call", help="call a method and print the JSON result")
    call.add_argument("url")
    call.add_argument("method", help="Service.method")
    call.add_argument(
        "args", nargs="*", help="JSON literals (plain words are strings); name=value for keywords"
    )
    call.add_argument("--stream", action="store_true", help="print one JSON line per streamed item")
    call.add_argument("--token")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    call.set_defaults(func=cmd_call)
    return parser


def _quiet_library_loggers(args: argparse.Namespace) -> None:
    """A transport's library may log each failure itself (aioquic: every failed handshake);
    the CLI prints one clear line of its own, so it quiets the ``library_loggers`` of the
    transports this command uses (bench: every one; the others load only what they use)."""
    if args.command == "bench":
        schemes = registry.schemes()
    else:
        urls = (
            args.urls if args.command == "serve" else [args.url] if args.command == "call" else []
        )
        schemes = []
        for url in urls:
            with contextlib.suppress(PolyrpcError):  # a bad URL: the command itself reports it
                schemes.append(split_scheme(url)[0])
    for scheme in schemes:
        try:
            transport = registry.get(scheme)
        except PolyrpcError:
            continue  # an unknown or broken transport: the command itself reports it
        for name in transport.library_loggers:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # `polyrpc serve URL module:object`: URLs have '@' or '://', objects have ':' only
        args.objects += [
            u
            for u in args.urls
            if ":" in u and "@" not in u and "://" not in u and not u.split(":", 1)[1].isdigit()
        ]
        args.urls = [u for u in args.urls if u not in args.objects]
        if not args.urls:
            parser.error("serve needs at least one URL")
    _quiet_library_loggers(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
