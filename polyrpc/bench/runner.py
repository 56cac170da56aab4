"""``polyrpc bench``: run each row's server and client in their own processes, repeat, take medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..core.runtime import loop_name
from .rows import reference_for, resolve_target

METRICS = ("p50_us", "p99_us", "requests_per_s", "mb_per_s")


@dataclass(frozen=True)
class Workload:
    """An echo workload: payload size and how many calls are kept in flight."""

    name: str
    payload_bytes: int
    in_flight: int


WORKLOADS = {
    "latency": Workload("latency", 64, 1),
    "rate": Workload("rate", 64, 128),
    "bulk": Workload("bulk", 1 << 20, 4),
}
HEADLINE = {"latency": "p50_us", "rate": "requests_per_s", "bulk": "mb_per_s"}
SERVER_START_TIMEOUT = 60.0


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyrpc.bench.worker", *args]


def _env() -> dict[str, str]:
    """Child processes import polyrpc exactly as this process did."""
    here = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


class ServerProcess:
    """A row's server in its own process; closing its stdin stops it."""

    def __init__(self, row: str) -> None:
        self.proc = subprocess.Popen(
            _worker("serve", row),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.proc.stdout is not None
        self.info = self.proc.stdout.readline().strip()
        if not self.info:
            error = self.stop() or "no output"
            raise RuntimeError(f"server did not start: {error.strip().splitlines()[-1]}")

    def stop(self) -> str:
        """Stop the server; returns what it wrote to stderr."""
        try:
            _, err = self.proc.communicate(input="", timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


def run_client(row: str, info: str, workload: Workload, seconds: float) -> dict[str, float]:
    """One client process running one workload against a running server."""
    args = [row, info, str(workload.payload_bytes), str(workload.in_flight), str(seconds)]
    done = subprocess.run(
        _worker("client", *args),
        capture_output=True,
        text=True,
        timeout=seconds * 4 + 120,
        env=_env(),
    )
    if done.returncode != 0 or not done.stdout.strip():
        lines = (done.stderr or "no output").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": loop_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summarise(row: str, workload: Workload, samples: list[dict], errors: list[str]) -> dict:
    """Median of the repeats for each metric, with the spread (min, max)."""
    result: dict[str, Any] = {
        "transport": row,
        "kind": resolve_target(row).kind,
        "workload": workload.name,
        "payload_bytes": workload.payload_bytes,
        "in_flight": workload.in_flight,
        "repeats": len(samples),
    }
    if not samples:
        result["error"] = errors[-1] if errors else "no result"
        return result
    for metric in METRICS:
        values = [s[metric] for s in samples]
        result[metric] = statistics.median(values)
        result[f"{metric}_spread"] = [min(values), max(values)]
    if errors:
        result["failed_repeats"] = errors
    return result


def run_bench(
    rows: list[str],
    workloads: list[str],
    seconds: float,
    repeat: int,
    console: Console,
) -> list[dict]:
    """Measure every (row, workload) ``repeat`` times, interleaving rows so noise hits all alike."""
    chosen = [WORKLOADS[w] for w in workloads]
    samples: dict[tuple[str, str], list[dict]] = {(r, w.name): [] for r in rows for w in chosen}
    errors: dict[tuple[str, str], list[str]] = {key: [] for key in samples}
    steps = repeat * len(rows) * len(chosen)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=steps)
        for round_no in range(1, repeat + 1):
            for row in rows:
                try:
                    server = ServerProcess(row)
                except Exception as exc:
                    for w in chosen:
                        errors[(row, w.name)].append(str(exc))
                        progress.advance(task)
                    continue
                try:
                    for w in chosen:
                        progress.update(
                            task, description=f"{row} {w.name} (round {round_no}/{repeat})"
                        )
                        try:
                            samples[(row, w.name)].append(run_client(row, server.info, w, seconds))
                        except Exception as exc:
                            errors[(row, w.name)].append(str(exc))
                        progress.advance(task)
                finally:
                    server.stop()
    return [
        summarise(r, w, samples[(r, w.name)], errors[(r, w.name)]) for r in rows for w in chosen
    ]


def _fmt(value: float, metric: str) -> str:
    if metric in ("p50_us", "p99_us"):
        return f"{value:,.1f}"
    if metric == "requests_per_s":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def render(results: list[dict], console: Console) -> None:
    """Print one table: a line per row and workload, with the ratio to its reference row."""
    table = Table(title="polyrpc bench (medians over repeats)")
    for column in ("row", "workload", "p50 µs", "p99 µs", "req/s", "MB/s", "vs reference"):
        table.add_column(column, justify="left" if column in ("row", "workload") else "right")
    by_key = {(r["transport"], r["workload"]): r for r in results}
    for r in results:
        if "error" in r:
            table.add_row(
                r["transport"], r["workload"], f"[red]failed: {r['error']}", "", "", "", ""
            )
            continue
        ratio = ""
        reference = reference_for(r["transport"])
        ref = by_key.get((reference, r["workload"])) if reference else None
        if ref and "error" not in ref:
            metric = HEADLINE[r["workload"]]
            ratio = f"{r[metric] / ref[metric]:.2f}× {reference}"
        table.add_row(
            r["transport"],
            r["workload"],
            _fmt(r["p50_us"], "p50_us"),
            _fmt(r["p99_us"], "p99_us"),
            _fmt(r["requests_per_s"], "requests_per_s"),
            _fmt(r["mb_per_s"], "mb_per_s"),
            ratio,
        )
    console.print(table)
    console.print(
        "ratios: latency = p50 / reference p50 (lower is better); "
        "rate and bulk = value / reference (higher is better)"
    )


def write_json(path: Path, results: list[dict], settings: dict[str, Any]) -> None:
    """The results in the documented schema, plus the machine and the settings used."""
    document = {"results": results, "machine": machine(), "settings": settings}
    path.write_text(json.dumps(document, indent=2) + "\n")
