"""The ``polyrpc`` command: list transports, benchmark them (and serve/call services)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

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
            raise SystemExit(f"polyrpc bench: unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
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
    reference = "raw-asyncio" if "raw-asyncio" in rows else None
    render(results, reference, console)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyrpc", description="Messages and remote calls over a transport chosen by URL."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    transports = sub.add_parser("transports", help="list transports and whether they work here")
    transports.set_defaults(func=cmd_transports)
    bench = sub.add_parser("bench", help="benchmark every usable transport on loopback")
    bench.add_argument("--transports", help="comma-separated rows (default: all usable + references)")
    bench.add_argument("--workloads", default="latency,rate,bulk", help="latency,rate,bulk")
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    bench.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
