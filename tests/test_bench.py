"""``polyrpc bench`` end to end in a short mode, its JSON schema, and its impaired paths."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from rich.console import Console

from polyrpc.bench.compare import compare
from polyrpc.bench.impair import (
    Impairment,
    NetemPath,
    StreamRelay,
    endpoint,
    parse_duration,
    parse_loss,
    parse_rate,
    redirect,
)
from polyrpc.bench.runner import (
    SCHEMA_PATH,
    WORKLOADS,
    NetworkPath,
    parse_size,
    plan,
    run_bench,
    size_label,
)
from polyrpc.testing.udp_relay import UdpRelay

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(SCHEMA_PATH.read_text()), format_checker=jsonschema.FormatChecker()
)


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyrpc.cli", "bench", "--repeat", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def validated(path: Path) -> dict:
    document = json.loads(path.read_text())
    VALIDATOR.validate(document)
    for row in document["results"]:
        if "p50_us" in row:
            assert 0 < row["p50_us"] <= row["p99_us"], row
            assert row["requests_per_s"] > 0 and row["repeats"] == 1, row
    return document


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """The pre-sweep command line, unchanged: named workloads over tcp and raw-asyncio."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = bench("--transports", "tcp,raw-asyncio", "--seconds", "0.2", "--json", str(out))
    return done, validated(out) if out.exists() else {}, out


def test_bench_short_run_writes_valid_json(short_run):
    done, document, _ = short_run
    assert done.returncode == 0, done.stderr
    rows = document["results"]
    assert {(r["transport"], r["workload"]) for r in rows} == {
        (t, w) for t in ("tcp", "raw-asyncio") for w in ("latency", "rate", "bulk")
    }
    for row in rows:
        for key in ("payload_bytes", "in_flight", "p50_us", "p99_us", "requests_per_s", "mb_per_s"):
            assert isinstance(row[key], int | float), (key, row)
        assert row["path"] == "loopback"
    assert document["machine"]["cpus"] >= 1
    assert len(document["machine"]["load_avg"]) == 3
    assert document["settings"]["impairment"]["mode"] == "loopback"
    assert "vs reference" in done.stdout and "raw-asyncio" in done.stdout


def test_sweep_plots_and_reports_skipped_and_failed_points(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    done = bench(
        "--transports",
        "tcp",
        "--workloads",
        "latency",
        "--sizes",
        "64,1K,65M",
        "--in-flight",
        "1,4",
        "--max-in-flight-bytes",
        "66M",
        "--seconds",
        "0.2",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    document = validated(out)
    by_name = {r["workload"]: r for r in document["results"]}
    # latency is 64 B x 1, so the sweep adds the other five points, not a duplicate
    assert list(by_name) == ["latency", "64@4", "1K@1", "1K@4", "65M@1", "65M@4"]
    assert "skipped" in by_name["65M@4"] and "max-in-flight-bytes" in by_name["65M@4"]["skipped"]
    assert "error" in by_name["65M@1"]  # over the 64 MiB frame limit: shown failed, not dropped
    assert all("p50_us" in by_name[n] for n in ("latency", "64@4", "1K@1", "1K@4"))
    assert done.returncode == 1, "a failed point makes the run fail"
    assert "failed:" in done.stdout and "skipped:" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_impaired_run_through_relays_says_what_was_impaired(tmp_path):
    out = tmp_path / "lossy.json"
    done = bench(
        "--transports",
        "tcp,kcp",
        "--workloads",
        "latency",
        "--loss",
        "1%",
        "--delay",
        "15ms",
        "--rate",
        "100mbit",
        "--impair-with",
        "relay",
        "--seconds",
        "0.5",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "cannot drop packets" in done.stdout
    document = validated(out)
    assert document["settings"]["impairment"]["mode"] == "relay"
    rows = {r["transport"]: r for r in document["results"]}
    assert rows["tcp"]["path"].startswith("tcp relay") and "no loss" in rows["tcp"]["path"]
    assert rows["kcp"]["path"].startswith("udp relay") and "loss 1%" in rows["kcp"]["path"]
    for row in rows.values():  # every round trip crosses the 15 ms delay twice
        assert row["p50_us"] >= 30_000, row


def test_stream_workload_pushes_one_way_and_counts_what_arrived(tmp_path):
    out, earlier = tmp_path / "stream.json", tmp_path / "earlier.json"
    rows = "tcp,tcp/rpc,raw-asyncio,raw-aioquic"
    done = bench("--transports", rows, "--workloads", "stream", "--seconds", "0.3")
    assert done.returncode == 0, done.stderr
    args = ("--transports", rows, "--workloads", "stream", "--seconds", "0.3", "--json")
    assert bench(*args, str(earlier)).returncode == 0
    done = bench(*args, str(out), "--compare", str(earlier))
    assert done.returncode == 0, done.stderr
    by_row = {r["transport"]: r for r in validated(out)["results"]}
    for row in ("tcp", "tcp/rpc", "raw-asyncio"):
        measured = by_row[row]
        # one-way: the server's count is the measure, there is no round trip to time
        assert "p50_us" not in measured and measured["mb_per_s"] > 0, measured
        assert measured["requests_per_s"] == pytest.approx(measured["mb_per_s"] * 1e6 / (1 << 20))
    assert by_row["raw-aioquic"]["skipped"] == "skipped: raw-aioquic has no one-way send"
    assert "change from the earlier run" in done.stdout and "failed" not in done.stdout
    assert "skipped now" in done.stdout  # raw-aioquic: said so, not counted as a failure


def test_compare_shows_change_per_point(short_run, tmp_path):
    _, document, _ = short_run
    old = document["results"]
    new = [dict(r) for r in old]
    for row in new:
        row["p50_us"] *= 2
        row["p50_us_spread"] = [v * 2 for v in row["p50_us_spread"]]
    console = Console(record=True, width=200)
    rows = compare(old, new, console)
    latency = next(r for r in rows if r["workload"] == "latency" and r["transport"] == "tcp")
    main = latency["changes"][0]
    assert main["metric"] == "p50_us" and main["relative"] == pytest.approx(1.0)
    assert not main["better"]
    assert "+100.0%" in console.export_text()


def test_compare_from_the_command_line(short_run, tmp_path):
    _, _, old = short_run
    done = bench(
        "--transports", "tcp", "--workloads", "latency", "--seconds", "0.2", "--compare", str(old)
    )
    assert done.returncode == 0, done.stderr
    assert "change from the earlier run" in done.stdout and "not run now" in done.stdout


def test_bad_arguments_fail_with_a_clear_message():
    done = bench("--transports", "tcp", "--sizes", "12Q")
    assert done.returncode != 0 and "--sizes" in done.stderr
    done = bench("--transports", "tcp", "--delay", "20")
    assert done.returncode != 0 and "duration" in done.stderr


def test_sizes_and_impairments_parse():
    assert [parse_size(s) for s in ["64", "1K", "64K", "1M", "16M"]] == [
        64,
        1024,
        65536,
        1 << 20,
        16 << 20,
    ]
    assert [size_label(n) for n in (64, 1024, 1536, 16 << 20)] == ["64", "1K", "1536", "16M"]
    assert parse_loss("1%") == pytest.approx(0.01) and parse_loss("0.5") == 0.5
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("250us") == pytest.approx(0.00025)
    assert parse_rate("100mbit") == 100e6 and parse_rate("1Gbit") == 1e9
    for bad in (lambda: parse_loss("100%"), lambda: parse_rate("100mbps")):
        with pytest.raises(ValueError):
            bad()
    spec = Impairment(loss=0.01, delay=0.02, jitter=0.005, rate=100e6)
    assert spec.netem_args() == [
        "limit",
        "10000",
        "delay",
        "20000us",
        "5000us",
        "loss",
        "1%",
        "rate",
        "100000000bit",
    ]
    assert spec.describe(lossless=True).startswith("delay 20 ms ± 5 ms")
    assert [p.name for p in plan(["rate"], [64, 1024], [128])] == ["rate", "1K@128"]
    # the one-way stream (1M, 1) is no echo: the 1M@1 echo point is still measured
    assert [p.name for p in plan(["stream"], [1 << 20], [1, 4])] == ["stream", "1M@1", "1M@4"]


def test_connect_info_is_redirected_to_a_relay():
    url = "quic@127.0.0.1:4433?ca=/tmp/x/cert.pem"
    assert endpoint(url, "udp") == "127.0.0.1:4433"
    assert redirect(url, "udp", "127.0.0.1:9") == "quic@127.0.0.1:9?ca=/tmp/x/cert.pem"
    assert redirect("127.0.0.1:5:/tmp/c.pem", "udp", "127.0.0.1:6") == "127.0.0.1:6:/tmp/c.pem"
    assert redirect("unix@/tmp/a.sock", "unix", "/tmp/b.sock") == "unix@/tmp/b.sock"
    with pytest.raises(ValueError):
        endpoint("unix@/tmp/a.sock", "tcp")


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_stream_relay_delays_rate_limits_and_keeps_bytes_intact():
    server = await _echo_server()
    target = server.sockets[0].getsockname()[:2]
    spec = Impairment(delay=0.02, jitter=0.005, rate=8e6)
    async with StreamRelay(target, spec) as relay:
        reader, writer = await asyncio.open_connection(*relay.address)
        started = time.perf_counter()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert time.perf_counter() - started >= 0.030  # 2 x (20 ms - 5 ms jitter)
        payload = os.urandom(200_000)  # 1.6 Mbit at 8 Mbit/s: >= 0.2 s each way
        started = time.perf_counter()
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        assert time.perf_counter() - started >= 0.2
        writer.write_eof()
        assert await reader.read() == b""  # EOF crosses the relay
        writer.close()
    server.close()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if self.transport is not None and data.startswith(b"ping"):
            self.transport.sendto(data, addr)
        self.arrivals.append((time.perf_counter(), data))


async def test_udp_relay_rate_limit_serialises_and_tail_drops():
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    target = server.transport.get_extra_info("sockname")[:2]
    # 1000-byte datagrams at 800 kbit/s: ~10 ms each; at most 50 ms may queue
    async with UdpRelay(target, rate=800e3, max_backlog=0.05, jitter=0.001, seed=3) as relay:
        _, client = await loop.create_datagram_endpoint(_Collector, remote_addr=relay.address)
        started = time.perf_counter()
        for n in range(20):
            client.transport.sendto(n.to_bytes(2, "big") + bytes(998))
        await asyncio.sleep(0.3)
        arrived = server.arrivals
        assert 4 <= len(arrived) <= 8, len(arrived)  # the rest overflowed the 50 ms queue
        assert relay.stats["up_overflow"] == 20 - len(arrived)
        assert arrived[-1][0] - started >= (len(arrived) - 1) * 0.0095
        client.transport.close()
    server.transport.close()


def test_netem_path_plumbing_namespace_veth_and_relays():
    """The netem path's namespace, veth pair and two relays carry tcp and udp rows."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    with NetemPath(Impairment()) as netem:  # no qdisc: this host's kernel may lack netem
        path = NetworkPath(Impairment(), "netem", netem)
        results = run_bench(
            ["tcp", "quic", "unix"], [WORKLOADS["latency"]], 0.2, 1, Console(quiet=True), path
        )
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert netem.namespace in namespaces.stdout
    rows = {r["transport"]: r for r in results}
    assert rows["tcp"]["p50_us"] > 0 and rows["quic"]["p50_us"] > 0, results
    assert rows["unix"]["skipped"].startswith("not impaired"), rows["unix"]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert netem.namespace not in namespaces.stdout


def test_report_shows_netem_runs_with_what_netem_dropped():
    """docs/benchmarks.md's netem section: the saved VM runs, each row with netem's drop count."""
    from polyrpc.bench.report import Run, netem_section

    docs = Path(__file__).resolve().parents[1] / "docs" / "bench"
    runs = [Run.load(path) for path in sorted(docs.glob("netem-vm-loss*.json"))]
    assert runs, "no saved netem runs in docs/bench"
    for run in runs:
        VALIDATOR.validate(run.document)
        assert run.settings["impairment"]["mode"] == "netem"
    text = "\n".join(netem_section(runs))
    assert "TCP segments included" in text
    for run in runs:
        assert run.settings["command"] in text
        for row in run.rows:  # every row's line ends with netem's own count of drops
            line = next(x for x in text.splitlines() if x.startswith(f"| `{row}` |"))
            assert line.rstrip(" |").endswith("%)"), line


def test_report_includes_the_sections_measured_elsewhere(tmp_path, capsys):
    """--section files (the VM-measured rdma section) appear verbatim, before the guidance."""
    from polyrpc.bench.report import main as report_main

    docs = Path(__file__).resolve().parents[1] / "docs" / "bench"
    section = tmp_path / "rdma.md"
    section.write_text("## RDMA somewhere else\n\nmeasured there: 1.23x\n")
    assert report_main([str(docs / "loopback.json"), "--section", str(section)]) == 0
    page = capsys.readouterr().out
    assert "## RDMA somewhere else\n\nmeasured there: 1.23x\n" in page
    assert page.index("## RDMA somewhere else") < page.index("## Choosing a transport")


def test_report_shows_the_stream_workload_where_a_run_has_it(capsys):
    """The saved named-workload run has `stream`: its own column, ratio, and no fake p50."""
    from polyrpc.bench.report import main as report_main

    docs = Path(__file__).resolve().parents[1] / "docs" / "bench"
    assert report_main([str(docs / "loopback.json"), "--targets", str(docs / "targets.json")]) == 0
    page = capsys.readouterr().out
    named = page[page.index("## The named workloads") :]
    assert "| bulk MB/s | stream MB/s |" in named
    assert re.search(r"`tcp` against the hand-written `raw-asyncio` .*stream \d", named)
    assert re.search(r"\| `tcp` \| stream \| – \| – \| [\d,]+ \| [\d,.]+ \|", page)
    assert "| `raw-aioquic` | stream | skipped: raw-aioquic has no one-way send |" in page
    assert "| rate calls/s | bulk MB/s |\n" in page  # the sweep run had no stream: no column


async def test_rpc_stream_count_includes_notifications_that_arrive_with_the_query():
    """The rpc rows' byte count: notifications written in the same batch as the count call
    are decoded with it, and an async call's first step runs at once, before their tasks;
    the count must still include them all (without its yield, ``received`` returned 0)."""
    from polyrpc.bench.targets import EchoService
    from polyrpc.rpc.endpoints import Server, connect

    server = Server()
    server.register(EchoService(), "Echo")
    url = await server.start("tcp@127.0.0.1:0")
    client = await connect(url)
    try:
        for _ in range(100):
            await client.notify("Echo.take", b"0123456789")
        assert await client.call("Echo.received") == 1000
    finally:
        await client.close()
        await server.close()
