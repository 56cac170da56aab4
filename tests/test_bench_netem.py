"""``polyrpc bench --impair-with netem`` for real: kernel netem on a veth pair, TCP included.

Runs in the soft-RoCE VM (``vm/rdma-vm.sh test``), whose Debian kernel has netem; the host
suite leaves this file out (scripts/test.sh), as most containers' kernels have no netem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from polyrpc.bench.impair import netem_unavailable_reason
from polyrpc.bench.runner import SCHEMA_PATH

DELAY_MS = 10
LOSS = 0.05


@pytest.fixture(scope="module")
def netem_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One short run: tcp, quic and kcp at 5% loss and 10 ms each way, latency and rate.

    (At 10% a QUIC handshake in the emulated VM now and then stalled until its idle timeout.)
    """
    reason = netem_unavailable_reason()
    if reason and not os.environ.get("POLYRPC_IN_RDMA_VM"):
        pytest.skip(f"netem cannot run here ({reason}); it runs in vm/rdma-vm.sh test")
    out = tmp_path_factory.mktemp("netem") / "netem.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "polyrpc.cli", "bench", "--impair-with", "netem"),
            *("--transports", "tcp,quic,kcp", "--workloads", "latency,rate"),
            *("--loss", f"{LOSS:.0%}", "--delay", f"{DELAY_MS}ms", "--rate", "100mbit"),
            *("--seconds", "1", "--repeat", "1", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out.read_text())
    jsonschema.Draft202012Validator(
        json.loads(SCHEMA_PATH.read_text()), format_checker=jsonschema.FormatChecker()
    ).validate(document)
    return done, document


def test_every_row_went_through_netem(netem_run):
    done, document = netem_run
    assert document["settings"]["impairment"]["mode"] == "netem"
    assert document["settings"]["impairment"]["loss"] == pytest.approx(LOSS)
    for row in document["results"]:
        assert row["path"].startswith("netem on a veth pair"), row
        assert row["netem"]["packets"] > 0, row
    assert "netem, tcp rate:" in done.stdout


def test_the_delay_is_in_every_round_trip(netem_run):
    _, document = netem_run
    for row in document["results"]:
        if row["workload"] == "latency":  # a call crosses the veth twice: >= 2 x 10 ms
            assert row["p50_us"] >= 2 * DELAY_MS * 1000, row


def test_tcp_sees_the_loss_as_well_as_udp(netem_run):
    _, document = netem_run
    for row in ("tcp", "quic", "kcp"):
        points = [r["netem"] for r in document["results"] if r["transport"] == row]
        sent = sum(p["packets"] for p in points)
        dropped = sum(p["drops"] for p in points)
        assert sent + dropped >= 150, (row, points)  # enough for the share to mean something
        # 5% asked: with 150 packets or more, outside 1-15% would be a broken path, not chance
        assert 0.01 < dropped / (sent + dropped) < 0.15, (row, points)
        # netem sees packets of at most one MTU (GSO off on the veth), not 64 KiB bursts
        assert sum(p["bytes"] for p in points) / sent <= 1514, (row, points)
