"""``polyrpc bench``: run each row's server and client in their own processes, repeat, take medians."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..session.runtime import loop_name
from .impair import Impairment, NetemPath, endpoint, redirect
from .rows import reference_for, resolve_target

METRICS = ("p50_us", "p99_us", "requests_per_s", "mb_per_s")
SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("schema.json")
"""The JSON Schema of what ``--json`` writes."""


@dataclass(frozen=True)
class Workload:
    """A workload: payload size and calls kept in flight (echo), or a one-way stream."""

    name: str
    payload_bytes: int
    in_flight: int
    one_way: bool = False
    """Messages pushed back to back, no replies: only MB/s and messages/s are measured."""


WORKLOADS = {
    "latency": Workload("latency", 64, 1),
    "rate": Workload("rate", 64, 128),
    "bulk": Workload("bulk", 1 << 20, 4),
    "stream": Workload("stream", 1 << 20, 1, one_way=True),
}
"""The named points: the first three are the defaults; ``stream`` is one-way 1 MiB messages,
what perftest's ``ib_send_bw`` measures for the verbs underneath."""
HEADLINE = {"latency": "p50_us", "rate": "requests_per_s", "bulk": "mb_per_s", "stream": "mb_per_s"}
LOWER_IS_BETTER = {"p50_us", "p99_us"}
SERVER_START_TIMEOUT = 60.0
DEFAULT_MAX_IN_FLIGHT_BYTES = 256 << 20

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``64``, ``1K``, ``64K``, ``1M``, ``16M`` -> bytes (K, M, G are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size like 64, 1K, 64K, 1M or 16M, got {text!r}")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


def size_label(size: int) -> str:
    """The short form used in point names: 65536 -> ``64K``."""
    for unit in ("G", "M", "K"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def headline(workload: dict | Workload) -> str:
    """The metric a point is judged by: latency alone, bulk in MB/s, small messages in req/s."""
    name = workload["workload"] if isinstance(workload, dict) else workload.name
    if name in HEADLINE:
        return HEADLINE[name]
    size = workload["payload_bytes"] if isinstance(workload, dict) else workload.payload_bytes
    flight = workload["in_flight"] if isinstance(workload, dict) else workload.in_flight
    if flight == 1:
        return "p50_us"
    return "mb_per_s" if size >= 64 << 10 else "requests_per_s"


def plan(workloads: list[str], sizes: list[int], in_flight: list[int]) -> list[Workload]:
    """Named workloads, then the sweep's size x in-flight echo points not already named
    (a one-way stream is not an echo, so it never stands in for one)."""
    points = [WORKLOADS[name] for name in workloads]
    seen = {(p.payload_bytes, p.in_flight) for p in points if not p.one_way}
    for size in sizes:
        for flight in in_flight:
            if (size, flight) not in seen:
                seen.add((size, flight))
                points.append(Workload(f"{size_label(size)}@{flight}", size, flight))
    return points


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyrpc.bench.worker", *args]


def _env() -> dict[str, str]:
    """Child processes import polyrpc exactly as this process did."""
    here = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


class WorkerProcess:
    """A long-running worker (server or relay); its first line is its address, stdin EOF stops it."""

    def __init__(self, args: list[str], what: str, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), *_worker(*args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.proc.stdout is not None
        self.info = self.proc.stdout.readline().strip()
        if not self.info:
            error = self.stop().strip() or "no output"
            raise RuntimeError(f"{what} did not start: {error.splitlines()[-1]}")

    def stop(self) -> str:
        """Stop the process; returns what it wrote to stderr."""
        try:
            _, err = self.proc.communicate(input="", timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


class ServerProcess(WorkerProcess):
    """A row's server in its own process."""

    def __init__(self, row: str) -> None:
        super().__init__(["serve", row], "server")


class NotImpairable(Exception):
    """This row's traffic cannot be sent through the chosen impaired path."""


@dataclass
class NetworkPath:
    """Where the client's traffic goes: loopback, a user-space relay, or netem on a veth pair."""

    impairment: Impairment = field(default_factory=Impairment)
    mode: str = "loopback"
    netem: NetemPath | None = None
    traffic: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    """What netem counted for each (row, point): packets and bytes sent, packets dropped."""

    def counters(self) -> dict[str, int] | None:
        """netem's counters now (None off the netem path)."""
        return self.netem.counters() if self.netem is not None else None

    def account(self, key: tuple[str, str], before: dict[str, int] | None) -> None:
        """Add what crossed netem since ``before`` to the traffic of ``key``."""
        if before is None:
            return
        after = self.counters() or before
        total = self.traffic.setdefault(key, dict.fromkeys(before, 0))
        for name in total:
            total[name] += after[name] - before[name]

    def describe(self, network: str) -> str:
        """What a row on ``network`` actually goes through (stored with each result)."""
        if self.mode == "loopback":
            return "loopback"
        if network not in (("tcp", "udp") if self.mode == "netem" else ("tcp", "udp", "unix")):
            return f"not impaired: {network} traffic cannot take the {self.mode} path"
        if self.mode == "netem":
            return f"netem on a veth pair: {self.impairment.describe()}"
        if network == "udp":
            return f"udp relay: {self.impairment.describe()}"
        text = f"{network} relay: {self.impairment.describe(lossless=True)}"
        if self.impairment.loss:
            text += " (no loss: a relay cannot drop TCP segments, so this row is not lossy)"
        return text

    def route(self, network: str, info: str) -> tuple[str, list[str], list[WorkerProcess]]:
        """Start the relays for one row; return the client's info, command prefix and relays."""
        if self.mode == "loopback":
            return info, [], []
        spec = json.dumps(self.impairment.as_dict())
        if self.mode == "relay":
            if network not in ("tcp", "udp", "unix"):
                raise NotImpairable(f"{network} traffic cannot pass a user-space relay")
            relay = WorkerProcess(
                ["relay", network, "127.0.0.1", endpoint(info, network), spec], "relay"
            )
            return redirect(info, network, relay.info), [], [relay]
        assert self.netem is not None
        if network not in ("tcp", "udp"):
            raise NotImpairable(f"{network} traffic does not cross the veth link")
        plain = json.dumps(Impairment().as_dict())
        far = WorkerProcess(
            ["relay", network, self.netem.host_ip, endpoint(info, network), plain], "relay"
        )
        try:
            near = WorkerProcess(
                ["relay", network, "127.0.0.1", far.info, plain], "relay", self.netem.prefix
            )
        except Exception:
            far.stop()
            raise
        return redirect(info, network, near.info), self.netem.prefix, [near, far]


def run_client(
    row: str, info: str, workload: Workload, seconds: float, prefix: list[str] | None = None
) -> dict[str, float]:
    """One client process running one workload against a running server."""
    args = [row, info, str(workload.payload_bytes), str(workload.in_flight), str(seconds)]
    if workload.one_way:
        args.append("stream")
    done = subprocess.run(
        [*(prefix or []), *_worker("client", *args)],
        capture_output=True,
        text=True,
        timeout=seconds * 4 + 120,
        env=_env(),
    )
    if done.returncode != 0 or not done.stdout.strip():
        lines = (done.stderr or "no output").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was when the run started."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "load_avg": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": loop_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summarise(
    row: str, workload: Workload, samples: list[dict], errors: list[str], path: str
) -> dict:
    """Median of the repeats for each metric, with the spread (min, max)."""
    result = _point(row, workload, path, len(samples))
    if not samples:
        result["error"] = errors[-1] if errors else "no result"
        return result
    for metric in (m for m in METRICS if m in samples[0]):
        values = [s[metric] for s in samples]
        result[metric] = statistics.median(values)
        result[f"{metric}_spread"] = [min(values), max(values)]
    if errors:
        result["failed_repeats"] = errors
    return result


def _point(row: str, workload: Workload, path: str, repeats: int) -> dict[str, Any]:
    """The fields every result carries, measured or not."""
    return {
        "transport": row,
        "kind": resolve_target(row).kind,
        "workload": workload.name,
        "payload_bytes": workload.payload_bytes,
        "in_flight": workload.in_flight,
        "path": path,
        "repeats": repeats,
    }


def _skip(row: str, workload: Workload, path: str, reason: str) -> dict:
    return {
        **_point(row, workload, path, 0),
        "skipped": reason,
    }


def run_bench(
    rows: list[str],
    workloads: list[Workload],
    seconds: float,
    repeat: int,
    console: Console,
    path: NetworkPath | None = None,
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
) -> list[dict]:
    """Measure every (row, workload) ``repeat`` times, interleaving rows so noise hits all alike."""
    path = path or NetworkPath()
    networks = {row: resolve_target(row).network for row in rows}
    skipped: dict[tuple[str, str], str] = {}
    for row in rows:
        for w in workloads:
            if w.one_way and not resolve_target(row).one_way:
                skipped[(row, w.name)] = f"skipped: {row} has no one-way send"
            elif w.payload_bytes * w.in_flight > max_in_flight_bytes:
                skipped[(row, w.name)] = (
                    f"skipped: {size_label(w.payload_bytes * w.in_flight)}B in flight is more "
                    f"than --max-in-flight-bytes {size_label(max_in_flight_bytes)}"
                )
    chosen = {row: [w for w in workloads if (row, w.name) not in skipped] for row in rows}
    samples: dict[tuple[str, str], list[dict]] = {(r, w.name): [] for r in rows for w in chosen[r]}
    errors: dict[tuple[str, str], list[str]] = {key: [] for key in samples}
    steps = repeat * len(samples)
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
                if not chosen[row]:
                    continue
                progress.update(task, description=f"{row} starting (round {round_no}/{repeat})")
                helpers: list[WorkerProcess] = []
                try:
                    server = ServerProcess(row)
                except Exception as exc:
                    for w in chosen[row]:
                        errors[(row, w.name)].append(str(exc))
                        progress.advance(task)
                    continue
                try:
                    info, prefix, helpers = path.route(networks[row], server.info)
                except NotImpairable as exc:
                    for w in chosen[row]:
                        skipped[(row, w.name)] = f"not impaired: {exc}"
                        progress.advance(task, repeat - round_no + 1)
                    chosen[row] = []
                    server.stop()
                    continue
                except Exception as exc:
                    for w in chosen[row]:
                        errors[(row, w.name)].append(f"impaired path failed: {exc}")
                        progress.advance(task)
                    server.stop()
                    continue
                failed: list[tuple[str, str]] = []
                try:
                    for w in chosen[row]:
                        progress.update(
                            task, description=f"{row} {w.name} (round {round_no}/{repeat})"
                        )
                        before = path.counters()
                        try:
                            sample = run_client(row, info, w, seconds, prefix)
                            samples[(row, w.name)].append(sample)
                            outcome = f"{sample['mb_per_s']:,.1f} MB/s"
                            if "p50_us" in sample:
                                outcome = f"p50 {sample['p50_us']:,.1f} µs, {outcome}"
                        except Exception as exc:
                            errors[(row, w.name)].append(str(exc))
                            failed.append((row, w.name))
                            outcome = f"failed: {exc}"
                        path.account((row, w.name), before)
                        progress.advance(task)
                        if not console.is_terminal:  # logs get a line per point instead of a bar
                            done = int(progress.tasks[0].completed)
                            console.print(
                                f"[{done}/{steps}] {row} {w.name}: {outcome}", markup=False
                            )
                finally:
                    for helper in helpers:
                        helper.stop()
                    said = server.stop().strip().splitlines()
                    for key in failed:  # the server's last words often say why the client failed
                        if said:
                            errors[key][-1] += f" (server: {said[-1]})"
    results = []
    for r in rows:
        note = path.describe(networks[r])
        for w in workloads:
            key = (r, w.name)
            if key in skipped:
                results.append(_skip(r, w, note, skipped[key]))
            else:
                results.append(summarise(r, w, samples[key], errors[key], note))
                if key in path.traffic:
                    results[-1]["netem"] = path.traffic[key]
    return results


def _fmt(value: float, metric: str) -> str:
    if metric == "requests_per_s":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def spread_percent(result: dict, metric: str) -> float:
    """Half the min-max range of ``metric`` over the repeats, in % of the median."""
    low, high = result[f"{metric}_spread"]
    median = result[metric]
    return (high - low) / 2 / median * 100 if median else 0.0


def render(results: list[dict], console: Console) -> None:
    """Print one table: a line per row and point, with the spread and the ratio to the reference."""
    table = Table(title="polyrpc bench (medians over repeats)")
    columns = ("row", "point", "size", "in flight", "p50 µs", "p99 µs", "req/s", "MB/s")
    for column in (*columns, "± %", "vs reference"):
        table.add_column(column, justify="left" if column in ("row", "point") else "right")
    by_key = {(r["transport"], r["workload"]): r for r in results}
    for r in results:
        cells = [r["transport"], r["workload"], size_label(r["payload_bytes"]), str(r["in_flight"])]
        if "error" in r or "skipped" in r:
            colour = "red" if "error" in r else "yellow"
            text = f"failed: {r['error']}" if "error" in r else r["skipped"]
            table.add_row(*cells, f"[{colour}]{escape(text)}", "", "", "", "", "")
            continue
        metric = headline(r)
        ratio = ""
        reference = reference_for(r["transport"])
        ref = by_key.get((reference, r["workload"])) if reference else None
        if ref and metric in ref:
            ratio = f"{r[metric] / ref[metric]:.2f}× {reference}"
        table.add_row(
            *cells,
            *(_fmt(r[m], m) if m in r else "–" for m in METRICS),
            f"{spread_percent(r, metric):.0f}",
            ratio,
        )
    console.print(table)
    console.print(
        "± % = half the min-max range over the repeats of the point's headline metric "
        "(p50 at 1 in flight, MB/s from 64K, req/s below). ratios: p50 / reference p50 "
        "(lower is better); req/s and MB/s = value / reference (higher is better)"
    )
    paths = sorted({r["path"] for r in results if r.get("path") != "loopback"})
    for note in paths:
        console.print(f"path: {note}", markup=False)
    for r in results:
        if "netem" in r:
            console.print(f"netem, {r['transport']} {r['workload']}: {netem_summary(r)}")


def netem_summary(result: dict) -> str:
    """What netem did to one point's packets, e.g. ``20,104 packets sent, 203 dropped (1.0%)``."""
    counted = result["netem"]
    offered = counted["packets"] + counted["drops"]
    share = counted["drops"] / offered * 100 if offered else 0.0
    return f"{counted['packets']:,} packets sent, {counted['drops']:,} dropped ({share:.1f}%)"


def write_json(
    path: Path, results: list[dict], settings: dict[str, Any], machine_info: dict[str, Any]
) -> None:
    """The results in the documented schema, plus the machine and the settings used."""
    document = {
        "schema_version": SCHEMA_VERSION,
        "results": results,
        "machine": machine_info,
        "settings": settings,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
