"""The polyrpc command line, run as a user would: real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def polyrpc(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyrpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


@pytest.fixture
def served(tmp_path):
    """`polyrpc serve` in the background; yields (process, bound urls)."""
    procs = []

    def start(*args: str) -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "polyrpc.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=tmp_path,
        )
        procs.append(proc)
        urls = []
        while True:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {proc.stderr.read()}"
            if line.startswith("serving on "):
                urls.append(line.split()[-1])
            if line.strip().startswith("clients: "):
                urls[-1] = line.split()[-1]  # the pinned URL to use
            if line.startswith("methods:"):
                return proc, urls

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_transports_lists_every_scheme():
    done = polyrpc("transports")
    assert done.returncode == 0
    for scheme in ("tcp", "tls", "unix", "mem"):
        assert scheme in done.stdout


def test_serve_demo_and_call(served):
    proc, (url,) = served("tcp@127.0.0.1:0", "--demo")
    assert polyrpc("call", url, "Demo.add", "1", "2").stdout.strip() == "3"
    assert polyrpc("call", url, "Demo.echo", "hello").stdout.strip() == '"hello"'
    assert json.loads(polyrpc("call", url, "Demo.echo", '{"a": [1, 2]}').stdout) == {"a": [1, 2]}
    assert polyrpc("call", url, "Demo.add", "a=1", "b=5").stdout.strip() == "6"
    streamed = polyrpc("call", url, "Demo.count", "3", "--stream")
    assert streamed.stdout.splitlines() == ["0", "1", "2"]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "stopped" in out


def test_call_errors_are_one_line_and_non_zero(served):
    _, (url,) = served("tcp@127.0.0.1:0", "--demo")
    for args, expected in [
        (("Demo.nope",), "unknown method 'Demo.nope'"),
        (("Demo.sleep", "5", "--timeout", "0.2"), "timed out"),
    ]:
        done = polyrpc("call", url, *args)
        assert done.returncode != 0
        assert expected in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    refused = polyrpc("call", "tcp@127.0.0.1:1", "Demo.add", "1", "2")
    assert refused.returncode != 0 and "connection refused" in refused.stderr
    bad_url = polyrpc("call", "nope@h:1", "Demo.add")
    assert bad_url.returncode != 0 and "unknown transport scheme 'nope'" in bad_url.stderr


def test_serve_user_object_with_token(served, tmp_path):
    (tmp_path / "mysvc.py").write_text(
        textwrap.dedent(
            """
            class Greeter:
                def hello(self, name):
                    return f"hello {name}"
            """
        )
    )
    _, (url,) = served("tcp@127.0.0.1:0", "mysvc:Greeter", "--token", "t0k")
    ok = polyrpc("call", url, "Greeter.hello", "ada", "--token", "t0k")
    assert ok.stdout.strip() == '"hello ada"'
    refused = polyrpc("call", url, "Greeter.hello", "ada")
    assert refused.returncode != 0 and "token" in refused.stderr


def test_serve_quic_generates_a_development_certificate(served):
    _, (pinned,) = served("quic@127.0.0.1:0", "--demo")
    assert "?fingerprint=" in pinned
    assert polyrpc("call", pinned, "_sys.ping").stdout.strip() == '"pong"'
    unpinned = pinned.split("?")[0]
    done = polyrpc("call", unpinned, "_sys.ping")
    assert done.returncode != 0 and "certificate" in done.stderr


def test_failing_quic_call_prints_one_line(served):
    _, (pinned,) = served("quic@127.0.0.1:0", "--demo")
    for url in (pinned.split("?")[0], pinned.split("?")[0] + "?fingerprint=" + "AB" * 32):
        done = polyrpc("call", url, "_sys.ping")
        assert done.returncode != 0 and "certificate" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_quic_call_fails_soon_when_the_server_is_killed(served):
    """Both processes on the CLI's event loop (uvloop when installed): the ICMP error that
    a dead server's port answers with must reach the client, not stop its socket reader."""
    import time

    proc, (pinned,) = served("quic@127.0.0.1:0", "--demo")
    call = subprocess.Popen(
        [sys.executable, "-m", "polyrpc.cli", "call", pinned, "Demo.sleep", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        time.sleep(3)  # the call is in flight (its interpreter needs a moment to start)
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        _, err = call.communicate(timeout=30)
        took = time.monotonic() - killed
        print(f"polyrpc call failed {took:.2f}s after kill -9 of the server")
        assert call.returncode == 1
        assert "ConnectionLost" in err and "port is closed" in err
        assert took < 3.0
    finally:
        call.kill()
        call.wait()
