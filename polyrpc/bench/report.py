"""Write docs/benchmarks.md from saved ``polyrpc bench --json`` runs (scripts/benchmarks.sh).

Every number in the page comes from the JSON files; the prose around them is
generated from what was measured, and the only hand-written part (the guidance
at the end) makes no numeric claims.

    python -m polyrpc.bench.report LOOPBACK.json LOSSY.json --images img > docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .runner import HEADLINE, LOWER_IS_BETTER, WORKLOADS, headline, size_label, spread_percent

NOISY_PERCENT = 25.0


def _us(value: float) -> str:
    """A latency in the unit that reads best: µs below 10 ms, ms above."""
    return f"{value / 1000:,.1f} ms" if value >= 10_000 else f"{value:,.0f} µs"


def _rate(value: float) -> str:
    return f"{value:,.0f} calls/s"


def _mb(value: float) -> str:
    return f"{value:,.1f} MB/s" if value < 100 else f"{value:,.0f} MB/s"


def _bytes(size: int) -> str:
    """65536 -> ``64 KiB``; 64 -> ``64 B``."""
    label = size_label(size)
    return f"{label[:-1]} {label[-1]}iB" if label[-1].isalpha() else f"{label} B"


def _signed(value: float) -> str:
    """A latency difference with its sign: ``+1.2 ms``, ``-850 µs`` (a true minus sign)."""
    return ("+" if value >= 0 else "−") + _us(abs(value))


def _x(ratio: float) -> str:
    return f"{ratio:.2f}×"


def _cell(result: dict | None, metric: str) -> str:
    if result is None:
        return "–"
    if "skipped" in result:
        return "skipped"
    if "error" in result:
        return "failed"
    if metric not in result:  # p50/p99 of a one-way stream: nothing round-trips
        return "–"
    value = result[metric]
    if metric in ("p50_us", "p99_us"):
        return f"{value:,.0f}"
    if metric == "requests_per_s":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Run:
    """One saved run and lookups into it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.results: list[dict] = document["results"]
        self.machine: dict[str, Any] = document["machine"]
        self.settings: dict[str, Any] = document["settings"]
        self.rows = list(dict.fromkeys(r["transport"] for r in self.results))
        self._by_point = {  # echo points: a one-way stream shares its size but is no echo
            (r["transport"], r["payload_bytes"], r["in_flight"]): r
            for r in self.results
            if not (r["workload"] in WORKLOADS and WORKLOADS[r["workload"]].one_way)
        }
        self._by_name = {(r["transport"], r["workload"]): r for r in self.results}

    @classmethod
    def load(cls, path: Path) -> Run:
        return cls(json.loads(path.read_text()))

    def at(self, row: str, size: int, in_flight: int) -> dict | None:
        """The result of ``row`` at one point (named or sweep)."""
        return self._by_point.get((row, size, in_flight))

    def named(self, row: str, workload: str) -> dict | None:
        return self._by_name.get((row, workload))

    def has(self, workload: str) -> bool:
        """Whether this run measured (or tried) the named ``workload`` at all."""
        return any(r["workload"] == workload for r in self.results)

    def measured(self, workload: str, kinds: tuple[str, ...] = ("message", "rpc")) -> list[dict]:
        """Measured results of one named point for rows of the given kinds."""
        return [
            r
            for r in self.results
            if r["workload"] == workload and "p50_us" in r and r.get("kind") in kinds
        ]

    def kind(self, row: str) -> str:
        return next(r.get("kind", "message") for r in self.results if r["transport"] == row)


def machine_section(runs: list[tuple[str, Run]]) -> str:
    """What the numbers were measured on and how (all from the JSON)."""
    first = runs[0][1].machine
    lines = [
        "## The machine and the settings",
        "",
        f"- CPU: {first.get('cpu_model', 'unknown')}, {first['cpus']} logical CPUs; "
        f"memory {first.get('memory_gib', '?')} GiB",
        f"- {first['platform']}, Python {first['python']}, event loop {first['event_loop']}",
    ]
    for label, run in runs:
        m, s = run.machine, run.settings
        load_end = m.get("load_avg_end", ["?"])[0]
        end = f"{load_end:.2f}" if isinstance(load_end, float) else load_end
        lines.append(
            f"- {label} run: started {m['time']}, 1-minute load {m['load_avg'][0]:.2f} at the "
            f"start and {end} at the end; {s['seconds']:g} s per point, "
            f"{s['repeat']} repeat(s) (medians reported, spread = min–max over the repeats); "
            f"command `{s.get('command', '?')}`"
        )
    unavailable = runs[0][1].settings.get("unavailable", {})
    for scheme, reason in unavailable.items():
        lines.append(f"- not measured: `{scheme}` is unavailable here ({reason})")
    if first["cpus"] <= 2:
        lines.append(
            f"- each row's server and client are separate processes; with {first['cpus']} CPUs "
            "they share the cores with each other (and with anything else running), so "
            "absolute numbers are low and the ratios between rows are the useful part"
        )
    return "\n".join(lines)


def _ranked(results: list[dict], metric: str, lower_better: bool) -> list[dict]:
    return sorted(results, key=lambda r: r[metric], reverse=not lower_better)


def loopback_findings(run: Run) -> list[str]:
    """Generated sentences about the loopback run; each one quotes the numbers it rests on."""
    out: list[str] = []
    latency = run.measured("latency")
    if latency:
        ranked = _ranked(latency, "p50_us", True)
        best, worst = ranked[0], ranked[-1]
        out.append(
            f"**Latency** (64 B, one call in flight): the fastest polyrpc row was "
            f"`{best['transport']}` at {_us(best['p50_us'])} median "
            f"(p99 {_us(best['p99_us'])}); the slowest was `{worst['transport']}` at "
            f"{_us(worst['p50_us'])} (p99 {_us(worst['p99_us'])})."
        )
        tcp = run.named("tcp", "latency")
        for scheme in ("quic", "kcp", "rdma", "unix", "tls"):
            other = run.named(scheme, "latency")
            if tcp and other and "p50_us" in tcp and "p50_us" in other:
                out.append(
                    f"`{scheme}` took {_x(other['p50_us'] / tcp['p50_us'])} tcp's median "
                    f"round trip ({_us(other['p50_us'])} against {_us(tcp['p50_us'])})."
                )
    rate = run.measured("rate")
    if rate:
        best = _ranked(rate, "requests_per_s", False)[0]
        out.append(
            f"**Small-message rate** (64 B, 128 in flight): the highest was "
            f"`{best['transport']}` with {_rate(best['requests_per_s'])}."
        )
        for row in run.rows:
            if "/" in row or run.kind(row) != "message":
                continue
            message, rpc = run.named(row, "rate"), run.named(f"{row}/rpc", "rate")
            if message and rpc and "p50_us" in message and "p50_us" in rpc:
                out.append(
                    f"Through the call API, `{row}/rpc` kept "
                    f"{rpc['requests_per_s'] / message['requests_per_s'] * 100:.0f}% of "
                    f"`{row}`'s message rate ({_rate(rpc['requests_per_s'])} against "
                    f"{_rate(message['requests_per_s'])})."
                )
    peaks = []
    for row in run.rows:
        measured = [r for r in run.results if r["transport"] == row and "mb_per_s" in r]
        if measured:
            peaks.append(max(measured, key=lambda r: r["mb_per_s"]))
    if peaks:
        peaks.sort(key=lambda r: r["mb_per_s"], reverse=True)
        listed = "; ".join(
            f"`{r['transport']}` {_mb(r['mb_per_s'])} "
            f"({_bytes(r['payload_bytes'])} × {r['in_flight']} in flight)"
            for r in peaks
        )
        out.append(f"**Bulk**: the best throughput of each row over all points: {listed}.")
    out += _references(run)
    out += _kcp_against_quic(run)
    out += _quality(run)
    return out


def _references(run: Run, include_rpc: bool = False) -> list[str]:
    """How far each polyrpc row is from the hand-written reference for its protocol."""
    from .rows import reference_for

    out = []
    for row in run.rows:
        reference = reference_for(row)
        if reference is None or reference not in run.rows or ("/" in row and not include_rpc):
            continue
        parts = []
        for workload, metric in HEADLINE.items():
            mine, theirs = run.named(row, workload), run.named(reference, workload)
            if mine and theirs and metric in mine and metric in theirs:
                parts.append(f"{workload} {_x(mine[metric] / theirs[metric])}")
        if parts:
            out.append(
                f"`{row}` against the hand-written `{reference}` "
                f"(p50 ratio for latency, lower is better; value ratio for the others, "
                f"higher is better): {', '.join(parts)}."
            )
    return out


def _quality(run: Run) -> list[str]:
    """Which points are noisy, failed or skipped (never silently dropped)."""
    out = []
    noisy = [
        r
        for r in run.results
        if "mb_per_s" in r and r["repeats"] > 1 and spread_percent(r, headline(r)) > NOISY_PERCENT
    ]
    measured = [r for r in run.results if "mb_per_s" in r]
    if measured:
        out.append(
            f"{len(noisy)} of {len(measured)} measured points varied by more than "
            f"±{NOISY_PERCENT:.0f}% between repeats"
            + (
                ": "
                + ", ".join(f"`{r['transport']}` {r['workload']}" for r in noisy[:12])
                + (" …" if len(noisy) > 12 else "")
                if noisy
                else ""
            )
            + "."
        )
    failed = [r for r in run.results if "error" in r]
    for r in failed:
        out.append(f"Failed: `{r['transport']}` {r['workload']}: {r['error']}.")
    skipped = [r for r in run.results if "skipped" in r]
    if skipped:
        reasons = sorted({r["skipped"].removeprefix("skipped: ") for r in skipped})
        out.append(f"Skipped {len(skipped)} point(s): " + "; ".join(reasons) + ".")
    return out


def lossy_findings(run: Run) -> list[str]:
    """Generated sentences about the impaired run, honest about what was impaired."""
    spec = run.settings["impairment"]
    floor = 2 * spec["delay"] * 1e6
    out = []
    paths = sorted({r["path"] for r in run.results})
    out.append("Paths: " + "; ".join(f"{p}" for p in paths) + ".")
    if spec["mode"] == "relay" and spec["loss"]:
        out.append(
            "This machine's kernel has no netem, so the loss was applied by a UDP relay: "
            "tcp (and tls, unix) rows only saw the delay and the rate limit, **not the loss**. "
            "Compare the UDP rows (quic, kcp and their references) with each other for loss "
            "recovery; the tcp rows show a lossless path with the same delay."
        )
    latency = [r for r in run.results if r["workload"] == "latency" and "p50_us" in r]
    if latency and floor:
        spread = 2 * spec["jitter"] * 1e6
        listed = "; ".join(
            f"`{r['transport']}` {_signed(r['p50_us'] - floor)} (p99 {_us(r['p99_us'])})"
            for r in sorted(latency, key=lambda r: r["p50_us"])
        )
        jitter = (
            f" (jitter moves a single round trip between {_us(floor - spread)} and "
            f"{_us(floor + spread)})"
            if spread
            else ""
        )
        out.append(
            f"**Latency**: each round trip crosses the path twice, {_us(floor)} of path delay "
            f"on average{jitter}. Median minus that average, per row: {listed}."
        )
    lossy = [r for r in latency if "loss" in r["path"] and "no loss" not in r["path"]]
    if lossy and spec["loss"]:
        tails = sorted(lossy, key=lambda r: r["p99_us"])
        out.append(
            f"Under {spec['loss'] * 100:g}% loss the lowest p99 among lossy rows was "
            f"`{tails[0]['transport']}` ({_us(tails[0]['p99_us'])}), the highest "
            f"`{tails[-1]['transport']}` ({_us(tails[-1]['p99_us'])})."
        )
    bulk = [r for r in run.results if r["workload"] == "bulk" and "mb_per_s" in r]
    if bulk:
        ceiling = f" (the link carries at most {spec['rate'] / 8e6:g} MB/s each way)"
        listed = "; ".join(
            f"`{r['transport']}` {_mb(r['mb_per_s'])}"
            for r in sorted(bulk, key=lambda r: r["mb_per_s"], reverse=True)
        )
        out.append(f"**Bulk** (1 MiB × 4){ceiling if spec['rate'] else ''}: {listed}.")
        link = spec["rate"] / 8e6
        if link and max(r["mb_per_s"] for r in bulk) < link / 2:
            out.append(
                f"No row reached half the link's {link:g} MB/s: the link rate was not what "
                "limited bulk on this path (the CPU or the loss recovery was)."
            )
    out += _kcp_against_quic(run)
    out += _quality(run)
    return out


COMPARED = (
    ("latency", "p50_us", "median latency"),
    ("latency", "p99_us", "p99 latency"),
    ("rate", "requests_per_s", "call rate"),
    ("bulk", "mb_per_s", "bulk throughput"),
)
"""The named points and metrics two rows are compared on."""


def _relative(run: Run, row: str, base: str) -> list[str]:
    """One sentence: ``row`` over ``base`` on each compared metric (none if nothing to compare)."""
    parts = []
    for workload, metric, what in COMPARED:
        mine, theirs = run.named(row, workload), run.named(base, workload)
        if mine and theirs and metric in mine and metric in theirs and theirs[metric]:
            parts.append(f"{what} {_x(mine[metric] / theirs[metric])}")
    if not parts:
        return []
    return [f"`{row}` relative to `{base}` on this path ({row} ÷ {base}): {', '.join(parts)}."]


def _kcp_against_quic(run: Run) -> list[str]:
    """The two UDP transports side by side: the numbers behind "when kcp, when quic"."""
    return _relative(run, "kcp", "quic")


NAMED_COLUMNS = (
    ("latency", "p50_us", "latency p50 µs"),
    ("latency", "p99_us", "latency p99 µs"),
    ("rate", "requests_per_s", "rate calls/s"),
    ("bulk", "mb_per_s", "bulk MB/s"),
    ("stream", "mb_per_s", "stream MB/s"),
)


def named_table(run: Run) -> str:
    """Rows by the named points, headline metrics and p99 (stream only if the run had it)."""
    columns = [c for c in NAMED_COLUMNS if c[0] != "stream" or run.has("stream")]
    header = ["row", "kind", *(title for _, _, title in columns)]
    body = [
        [f"`{row}`", run.kind(row), *(_cell(run.named(row, w), m) for w, m, _ in columns)]
        for row in run.rows
    ]
    return _table(header, body)


def sweep_tables(run: Run) -> list[str]:
    """The sweep as matrices matching the plot panels (rows by size or by in-flight)."""
    sizes, flights = run.settings.get("sizes") or [], run.settings.get("in_flight") or []
    if not sizes or not flights:
        return []
    out = []
    lat_flight = flights[0]
    out.append(f"Median latency (µs) by payload size, {lat_flight} call(s) in flight:")
    out.append(
        _table(
            ["row", *(size_label(s) for s in sizes)],
            [
                [f"`{row}`", *(_cell(run.at(row, s, lat_flight), "p50_us") for s in sizes)]
                for row in run.rows
            ],
        )
    )
    out.append(f"Calls per second by calls in flight, {size_label(sizes[0])} B payloads:")
    out.append(
        _table(
            ["row", *(str(f) for f in flights)],
            [
                [
                    f"`{row}`",
                    *(_cell(run.at(row, sizes[0], f), "requests_per_s") for f in flights),
                ]
                for row in run.rows
            ],
        )
    )
    for flight in flights:
        out.append(f"Throughput (MB/s of echoed payload) by payload size, {flight} in flight:")
        out.append(
            _table(
                ["row", *(size_label(s) for s in sizes)],
                [
                    [f"`{row}`", *(_cell(run.at(row, s, flight), "mb_per_s") for s in sizes)]
                    for row in run.rows
                ],
            )
        )
    return out


def full_table(run: Run) -> str:
    """Every point with all metrics and spreads, for the record."""
    header = ["row", "point", "p50 µs", "p99 µs", "calls/s", "MB/s", "± % (headline)"]
    body = []
    for r in run.results:
        if "mb_per_s" in r:
            spread = f"{spread_percent(r, headline(r)):.0f}"
            cells = [_cell(r, m) for m in ("p50_us", "p99_us", "requests_per_s", "mb_per_s")]
        else:
            spread = ""
            cells = [r.get("error") or r.get("skipped", ""), "", "", ""]
        body.append([f"`{r['transport']}`", r["workload"], *cells, spread])
    return _table(header, body)


HOW_TO_RUN = """\
## Running it yourself

- `polyrpc bench` measures the three named points (latency, rate, bulk) over every
  usable transport and the references; `--transports tcp,quic,raw-aioquic` picks rows.
  `--workloads latency,rate,bulk,stream` adds `stream`: 1 MiB one-way messages pushed
  back to back, timed until the server has counted every byte (MB/s only; the rows
  without a one-way send, raw-aioquic and raw-aiokcp, are listed as skipped).
- `--sizes 64,1K,64K,1M,16M --in-flight 1,16,128` adds a sweep; points whose bytes in
  flight exceed `--max-in-flight-bytes` are listed as skipped, and a point that fails is
  listed with its error.
- `--loss 1% --delay 20ms --jitter 5ms --rate 100mbit` puts every row behind the same
  impaired path: netem on a veth pair where the kernel has it (`--impair-with netem`),
  user-space relays otherwise (`--impair-with relay`, where TCP rows see the delay and
  the rate but not the loss). The output says which rows got which path.
  `sudo vm/rdma-vm.sh bench-impaired [ARGS]` runs it with netem in the soft-RoCE VM
  (tcp, quic and kcp with their /rpc rows unless ARGS say otherwise; `POLYRPC_VM_OUT=DIR`
  keeps the JSON).
- `--seconds` and `--repeat` set the length of each point and how many times it is
  repeated (medians are reported with the min–max spread); `--json FILE` writes the
  results (schema: `polyrpc/bench/schema.json`), `--plot FILE.png` draws them and
  `--compare OLD.json` shows the change per point from an earlier run.
"""


GUIDANCE = """\
## Choosing a transport

This section is written by hand and makes no numeric claims; the numbers above
(and a run on your own machines) are what to decide with.

- **tcp** (and **unix** on one host, **tls** across an untrusted network) is the
  default. The kernel does the reliability and congestion control, every network
  lets it through, and it is the simplest to operate and debug.
- **quic** when you want encryption without a separate TLS layer, many independent
  calls on one connection that must not wait for each other's lost packets
  (no head-of-line blocking across streams), or connections that survive the
  client's address changing. It runs in user space on UDP, so it costs more CPU
  per byte than kernel TCP, and some networks block or throttle UDP.
- **kcp** when small messages must arrive quickly over a lossy or jittery path
  (wireless, mobile, long-haul links) and spending extra bandwidth on aggressive
  retransmission is acceptable. It has no encryption and no congestion control in
  its fast modes, so it is a poor neighbour on a shared, congested link and a poor
  choice for bulk transfers.
- On a path that really loses packets (the netem runs above), the small-call tail is
  where the transports differ most: a TCP segment lost with nothing sent after it waits
  for a retransmission timeout, while kcp retransmits early and aggressively, and quic
  keeps independent calls on separate streams so that a loss delays only the calls
  whose data it carried. For small calls over a lossy link compare the p99 columns
  there; for bulk, TCP's and QUIC's congestion control slow down on loss by design
  (what a shared link needs), where kcp's fast modes keep sending.
- **rdma** when both ends have RDMA-capable NICs (InfiniBand or RoCE) in a data
  centre and the goal is the lowest latency and CPU cost for large or frequent
  transfers; it needs the hardware (or soft-RoCE for testing) and a lossless or
  well-managed fabric.
- Compare each polyrpc row with its `raw-*` reference: that gap is what the library
  costs over a hand-written echo on the same protocol, and it is where to look first
  when a transport seems slow.
"""


def targets_section(run: Run) -> list[str]:
    """The named workloads measured longer, each row against its reference."""
    stream = (
        " and the one-way stream (1 MiB messages pushed back to back, MB/s the server counted; "
        "raw-aioquic and raw-aiokcp have no one-way mode)"
        if run.has("stream")
        else ""
    )
    return [
        "## The named workloads, measured longer",
        "",
        "The three workloads the project's speed targets are stated in (latency: 64 B, one "
        f"call in flight; rate: 64 B, 128 in flight; bulk: 1 MiB, 4 in flight){stream}, for "
        "the rows that have a hand-written reference, in one run with more time and repeats "
        "per point than the sweep.",
        "",
        *[f"- {line}" for line in _references(run, include_rpc=True)],
        "",
        named_table(run),
        "",
    ]


def extra_impaired_section(run: Run) -> list[str]:
    """Another impaired-path run (e.g. heavier loss), without its own plot."""
    return [
        f"## Impaired path: {_describe(run.settings['impairment'])}",
        "",
        *[f"- {line}" for line in lossy_findings(run)],
        "",
        named_table(run),
        "",
    ]


NETEM_INTRO = """\
This host's kernel has no netem, so these runs were made in the soft-RoCE VM
(`vm/rdma-vm.sh`: Debian's kernel under qemu), where `polyrpc bench --impair-with netem`
puts each row's client in a network namespace joined to the server's side by a veth pair
with netem on both ends. netem delays, rate-limits and drops every packet that crosses the
pair, **TCP segments included** (GSO is off on the pair, so a drop is one packet of at most
one MTU, not a 64 KiB burst). The qdisc counters below are netem's own: how many packets it
sent and dropped while each row ran. The VM's CPUs are emulated (qemu TCG), so CPU-bound
numbers (call rate, bulk) are far below the host's: compare these rows with each other, not
with the tables above; the path delay dominates the latencies here as it would on a real
link. A run without loss on the same path is the baseline: its medians above the path
delay are what the emulated CPUs add (each row's client, server and the two plain relays
that carry its traffic across the pair are separate processes)."""


def netem_table(run: Run) -> str:
    """The named points of a netem run, with what netem dropped of each row's packets."""
    header = [
        "row",
        "latency p50 µs",
        "latency p99 µs",
        "rate calls/s",
        "bulk MB/s",
        "packets through netem",
        "dropped by netem",
    ]
    body = []
    for row in run.rows:
        points = [r for r in run.results if r["transport"] == row]
        lat, rate, bulk = (run.named(row, w) for w in ("latency", "rate", "bulk"))
        sent = sum(r["netem"]["packets"] for r in points if "netem" in r)
        dropped = sum(r["netem"]["drops"] for r in points if "netem" in r)
        share = f" ({dropped / (sent + dropped) * 100:.1f}%)" if sent + dropped else ""
        body.append(
            [
                f"`{row}`",
                _cell(lat, "p50_us"),
                _cell(lat, "p99_us"),
                _cell(rate, "requests_per_s"),
                _cell(bulk, "mb_per_s"),
                f"{sent:,}",
                f"{dropped:,}{share}",
            ]
        )
    return _table(header, body)


def _against_tcp(run: Run) -> list[str]:
    """Each other message row relative to tcp on the same lossy path."""
    out = []
    for row in run.rows:
        if row != "tcp" and run.kind(row) == "message":
            out += _relative(run, row, "tcp")
    return out


def _best_by_metric(runs: list[Run]) -> list[str]:
    """Which message row won each named point at each loss level (the basis for choosing)."""
    out = []
    for run in runs:
        spec = run.settings["impairment"]
        wins = []
        for workload, metric, what in COMPARED:
            measured = [r for r in run.measured(workload, ("message",)) if metric in r]
            if measured:
                best = _ranked(measured, metric, metric in LOWER_IS_BETTER)[0]
                wins.append(f"{what} `{best['transport']}` ({_show(best, metric)})")
        if wins:
            out.append(f"At {spec['loss'] * 100:g}% loss the best was: {'; '.join(wins)}.")
    return out


def _show(result: dict | None, metric: str) -> str:
    """One metric of one point in its unit, or why there is none."""
    if result is None or metric not in result:
        return "failed" if result and "error" in result else "–"
    if metric in LOWER_IS_BETTER:
        return _us(result[metric])
    return _rate(result[metric]) if metric == "requests_per_s" else _mb(result[metric])


def _across_loss(runs: list[Run]) -> list[str]:
    """Each message row's compared metrics from the least to the most lossy run."""
    if len(runs) < 2:
        return []
    ordered = sorted(runs, key=lambda run: run.settings["impairment"]["loss"])
    levels = " → ".join(f"{run.settings['impairment']['loss'] * 100:g}%" for run in ordered)
    out = []
    for workload, metric, what in COMPARED:
        rows = [row for row in ordered[0].rows if ordered[0].kind(row) == "message"]
        listed = "; ".join(
            f"`{row}` " + " → ".join(_show(run.named(row, workload), metric) for run in ordered)
            for row in rows
        )
        out.append(f"As the loss goes {levels}, {what}: {listed}.")
    return out


def netem_section(runs: list[Run]) -> list[str]:
    """Runs through kernel netem in the VM: the one impaired path where TCP sees the loss."""
    first = runs[0].machine
    parts = [
        "## Impaired path with real packet loss: netem in the soft-RoCE VM",
        "",
        NETEM_INTRO,
        "",
        f"- VM: {first['cpus']} emulated CPUs ({first.get('cpu_model', 'unknown')}), "
        f"{first.get('memory_gib', '?')} GiB; {first['platform']}, Python {first['python']}, "
        f"event loop {first['event_loop']}",
        "- Run on the host as `vm/rdma-vm.sh bench-impaired ARGS` (scripts/benchmarks.sh), "
        "where ARGS are the `polyrpc bench` arguments after `--impair-with netem` below.",
        *[f"- {line}" for line in _best_by_metric(runs)],
        *[f"- {line}" for line in _across_loss(runs)],
        "",
    ]
    for run in runs:
        m, s = run.machine, run.settings
        parts += [
            f"### {_describe(s['impairment'])}",
            "",
            f"- Command (in the VM): `{s.get('command', '?')}`; started {m['time']}, "
            f"{s['seconds']:g} s per point, {s['repeat']} repeat(s).",
            *[f"- {line}" for line in lossy_findings(run)],
            *[f"- {line}" for line in _against_tcp(run)],
            "",
            netem_table(run),
            "",
        ]
    return parts


def render(
    loopback: Run,
    lossy: Run | None,
    images: str,
    targets: Run | None = None,
    more_lossy: list[Run] | None = None,
    netem: list[Run] | None = None,
    sections: list[str] | None = None,
) -> str:
    """The whole page."""
    runs = [("loopback", loopback)] + ([("impaired-path", lossy)] if lossy else [])
    runs += [("named-workload", targets)] if targets else []
    runs += [("impaired-path", run) for run in more_lossy or []]
    vm_runs = [(f"netem in the VM, {_describe(r.settings['impairment'])}", r) for r in netem or []]
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/benchmarks.sh (polyrpc/bench/report.py) from a fresh run; "
        "do not edit by hand. -->",
        "",
        "Every number on this page was measured by `polyrpc bench` in the run recorded in "
        "`docs/bench/*.json` and written here by a script; rerun `scripts/benchmarks.sh` to "
        "regenerate it on your machine. Each row's server and client run in separate "
        "processes; each point is an echo of a payload of the given size with the given "
        "number of calls kept in flight. Rows: polyrpc transports through the message core "
        "(`tcp`, `quic`, …), the same through the call API (`tcp/rpc`, …) and hand-written "
        "references that do not use polyrpc (`raw-asyncio`, `raw-aioquic`, `raw-aiokcp`).",
        "",
        machine_section(runs),
        "",
        *(targets_section(targets) if targets else []),
        "## Loopback",
        "",
        f"![latency, rate and throughput on loopback]({images}/bench-loopback.png)",
        "",
        "### What the numbers say",
        "",
        *[f"- {line}" for line in loopback_findings(loopback)],
        "",
        "### Named points",
        "",
        named_table(loopback),
        "",
        "### Sweep",
        "",
    ]
    for block in sweep_tables(loopback):
        parts += [block, ""]
    if lossy is not None:
        spec = lossy.settings["impairment"]
        parts += [
            f"## Impaired path: {_MODE_TITLE.get(spec['mode'], spec['mode'])}",
            "",
            f"The same rows through {_describe(spec)}."
            + (
                " For real loss on every row, TCP included, see the netem runs in the VM "
                "below (“Impaired path with real packet loss”)."
                if netem and spec["mode"] == "relay"
                else ""
            ),
            "",
            f"![latency, rate and throughput on the impaired path]({images}/bench-lossy.png)",
            "",
            "### What the numbers say",
            "",
            *[f"- {line}" for line in lossy_findings(lossy)],
            "",
            named_table(lossy),
            "",
        ]
    for run in more_lossy or []:
        parts += extra_impaired_section(run)
    if netem:
        parts += netem_section(netem)
    for text in sections or []:
        parts += [text.rstrip(), ""]
    parts += [GUIDANCE, HOW_TO_RUN, "## Every point", ""]
    for label, run in runs + vm_runs:
        parts += [
            f"<details><summary>{label}: all {len(run.results)} points</summary>",
            "",
            full_table(run),
            "",
            "</details>",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


_MODE_TITLE = {
    "relay": "user-space relays on this host (UDP rows lossy, TCP rows not)",
    "netem": "netem on a veth pair (TCP rows impaired too)",
}


def _describe(spec: dict[str, Any]) -> str:
    from .impair import Impairment

    impairment = Impairment(spec["loss"], spec["delay"], spec["jitter"], spec["rate"])
    how = {
        "netem": "netem on a veth pair (every row's packets, TCP's included)",
        "relay": "user-space relays (UDP rows lossy; TCP rows delayed and rate-limited only)",
    }.get(spec["mode"], spec["mode"])
    return f"a path with {impairment.describe()}, made by {how}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loopback", type=Path)
    parser.add_argument("lossy", type=Path, nargs="?")
    parser.add_argument("--images", default="img", help="image folder, relative to the page")
    parser.add_argument("--targets", type=Path, help="a longer run of the named workloads")
    parser.add_argument(
        "--more-lossy", type=Path, action="append", default=[], help="further impaired runs"
    )
    parser.add_argument(
        "--netem", type=Path, action="append", default=[], help="netem runs made in the VM"
    )
    parser.add_argument(
        "--section",
        type=Path,
        action="append",
        default=[],
        help="a Markdown section measured elsewhere (e.g. docs/bench/rdma-vm.md), included as is",
    )
    args = parser.parse_args(argv)
    lossy = Run.load(args.lossy) if args.lossy else None
    targets = Run.load(args.targets) if args.targets else None
    more = [Run.load(path) for path in args.more_lossy]
    netem = [Run.load(path) for path in args.netem]
    sections = [path.read_text() for path in args.section]
    page = render(Run.load(args.loopback), lossy, args.images, targets, more, netem, sections)
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
