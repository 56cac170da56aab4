"""The ``polyrpc`` command: list transports, benchmark them (and serve/call services)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from .core.errors import PolyrpcError
from .core.registry import registry


def cmd_transports(args: argparse.Namespace) -> int:
    """Print every scheme, whether it works here and, if not, why and how to fix it."""
    console = Console()
    for row in registry.describe():
        if row.usable:
            console.print(f"[green]✔[/] {row.scheme:<6} {row.description} ({row.source})")
        else:
            console.print(f"[red]✘[/] {row.scheme:<6} unavailable: {row.reason} ({row.source})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the cross-transport benchmark and print (and optionally save) the table."""
    from .bench.rows import default_rows, resolve_target
    from .bench.runner import WORKLOADS, render, run_bench, write_json

    console = Console(stderr=False)
    rows = args.transports.split(",") if args.transports else default_rows()
    workloads = args.workloads.split(",")
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(
                f"polyrpc bench: unknown workload {name!r}; valid: {', '.join(WORKLOADS)}"
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
    console.print(
        f"rows: {', '.join(rows)}; workloads: {', '.join(workloads)}; "
        f"{args.seconds:g}s each, {args.repeat} repeat(s)"
    )
    results = run_bench(rows, workloads, args.seconds, args.repeat, console)
    render(results, console)
    if args.json:
        settings = {
            "rows": rows,
            "workloads": workloads,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "command": " ".join(["polyrpc", *sys.argv[1:]]),
        }
        write_json(Path(args.json), results, settings)
        console.print(f"wrote {args.json}")
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
    from .core.endpoints import Server
    from .core.runtime import run

    if not args.demo and not args.objects:
        raise SystemExit("polyrpc serve: give module:object to serve, or --demo")
    services: list[Any] = [_load_object(spec) for spec in args.objects]
    if args.demo:
        from .demo import Demo

        services.append(Demo())

    async def main() -> int:
        server = Server(token=args.token)
        for service in services:
            server.register(service)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: loop.create_task(server.close()))
        with tempfile.TemporaryDirectory(prefix="polyrpc-dev-") as workdir:
            try:
                for url in args.urls:
                    url, fingerprint = _development_certificate(url, Path(workdir))
                    bound = await server.start(url)
                    print(f"serving on {bound}", flush=True)
                    if fingerprint:
                        print(
                            f"  self-signed development certificate, SHA-256 {fingerprint}\n"
                            f"  clients: {bound}?fingerprint={fingerprint}",
                            flush=True,
                        )
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


def _development_certificate(url: str, workdir: Path) -> tuple[str, str | None]:
    """quic listeners without ?cert= get a fresh self-signed one (printed with its fingerprint)."""
    if not url.startswith(("quic@", "quic://")):
        return url, None
    from .transports.quic import with_development_certificate

    return with_development_certificate(url, workdir)


def _parse_argument(text: str) -> Any:
    """A JSON literal if it parses as one, else the plain word as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    """Call one method and print its JSON result (one line per item with --stream)."""
    from .core.endpoints import connect
    from .core.runtime import run

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
    bench.add_argument("--workloads", default="latency,rate,bulk", help="latency,rate,bulk")
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    bench.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
