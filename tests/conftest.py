"""Shared fixtures: the conformance suite runs over every transport usable here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyrpc import registry
from polyrpc.rpc import connection
from polyrpc.session import core, routing
from polyrpc.wire import codecs, frames

ROOT = Path(__file__).parent.parent
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
"""For processes of the tests' own: they import polyrpc and tests/ as this one does."""

REQUIRED = [s for s in os.environ.get("POLYRPC_REQUIRE_TRANSPORTS", "").split(",") if s]
ONLY = [s for s in os.environ.get("POLYRPC_TEST_TRANSPORTS", "").split(",") if s]


def usable_transports() -> list[str]:
    """Schemes to run the conformance suite over; required-but-unusable ones fail loudly."""
    rows = {row.scheme: row for row in registry.describe()}
    for scheme in REQUIRED:
        row = rows.get(scheme)
        if row is None or not row.usable:
            reason = row.reason if row else "not registered"
            raise pytest.UsageError(
                f"transport {scheme!r} is required (POLYRPC_REQUIRE_TRANSPORTS) but unusable: "
                f"{reason}"
            )
    schemes = [s for s, row in rows.items() if row.usable]
    if ONLY:
        schemes = [s for s in schemes if s in ONLY]
    return schemes


def subprocess_schemes() -> list[str]:
    """The usable transports a server in another process can listen on (not in-process mem)."""
    return [scheme for scheme in usable_transports() if scheme != "mem"]


class Endpoint:
    """How to reach a transport in tests: a listen URL and the client's extra options."""

    def __init__(self, scheme: str, workdir: Path) -> None:
        self.scheme = scheme
        self.transport = registry.get(scheme)
        self.listen_url, self.client_options = self.transport.loopback_urls(workdir)

    def client_url(self, bound_url: str) -> str:
        """The URL a client dials for a listener bound at ``bound_url``."""
        address = self.transport.parse(bound_url).with_options(**self.client_options)
        return str(address)

    @property
    def in_process(self) -> bool:
        return self.scheme == "mem"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scheme" in metafunc.fixturenames:
        metafunc.parametrize("scheme", usable_transports())


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch):
    """Serve with the C accelerator (decoder routing, EagerServer, payload scans) or the
    Python reference."""
    if request.param == "python":
        monkeypatch.setattr(core, "RoutingDecoder", routing.PyRoutingDecoder)
        monkeypatch.setattr(connection, "EagerServer", None)
        monkeypatch.setattr(codecs, "scan_msgpack", codecs.msgpack_counts)
        monkeypatch.setattr(codecs, "scan_json", codecs.json_counts)
    elif frames.ACCELERATED is None:
        pytest.skip("the C accelerator is not built")
    else:
        from polyrpc.wire import _frames

        monkeypatch.setattr(core, "RoutingDecoder", routing.for_codec(frames.ACCELERATED))
        monkeypatch.setattr(codecs, "scan_msgpack", _frames.msgpack_counts)
        monkeypatch.setattr(codecs, "scan_json", _frames.json_counts)
    return request.param


@pytest.fixture
def endpoint(scheme: str) -> Endpoint:
    # unix socket paths must stay short (108 bytes), so use a short temp dir
    with tempfile.TemporaryDirectory(prefix="prpc") as workdir:
        yield Endpoint(scheme, Path(workdir))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI a skipped test is a failure: a skip there would hide missing work."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run everything: {reason}"


@contextlib.contextmanager
def serve_subprocess(endpoint: Endpoint, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``polyrpc serve`` on ``endpoint``'s transport with ``args``, in a process of its own:
    yields the process and the URL clients dial; killed on exit."""
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "polyrpc.cli", "serve", endpoint.listen_url, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=SUBPROCESS_ENV,
            cwd=ROOT,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.startswith("serving on "):
                log.seek(0)
                raise AssertionError(f"serve failed: {line}{log.read()[-2000:]}")
            yield server, endpoint.client_url(line.split()[-1])
        finally:
            server.kill()
            server.wait()
