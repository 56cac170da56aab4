"""The RPC conformance behaviours once more, served by the pure-Python reference.

Connections normally serve their usual calls with the C accelerator's EagerServer and
hand the rest to ``RpcConnection.on_request``; here every call takes the Python path,
over tcp, so the reference stays correct too.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import pytest

import polyrpc
from polyrpc.rpc import connection, eager
from polyrpc.wire import frames
from tests import test_rpc_conformance as conformance
from tests import test_rpc_faults as faults
from tests.conftest import Endpoint

BEHAVIOURS = [
    test
    for module in (conformance, faults)
    for name, test in vars(module).items()
    if name.startswith("test_")
    and inspect.iscoroutinefunction(test)
    and list(inspect.signature(test).parameters) == ["endpoint"]
]


@pytest.fixture
def tcp_endpoint():
    with tempfile.TemporaryDirectory(prefix="prpc") as workdir:
        yield Endpoint("tcp", Path(workdir))


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda test: test.__name__[5:])
async def test_on_the_python_call_server(behaviour, tcp_endpoint, monkeypatch):
    monkeypatch.setattr(connection, "EagerServer", None)
    await behaviour(tcp_endpoint)


async def _call_server_in_use(endpoint: Endpoint) -> type:
    async with conformance.rpc(endpoint, conformance.Arith()) as (_, client, _):
        assert await client.call("Arith.mul", 6, 7) == 42
        return type(client._request_handler)


async def test_the_reference_is_what_serves_above(tcp_endpoint, monkeypatch):
    monkeypatch.setattr(connection, "EagerServer", None)
    assert await _call_server_in_use(tcp_endpoint) is type(
        connection.RpcConnection.on_request.__get__(0)
    )


@pytest.mark.skipif(frames.ACCELERATED is None, reason="the C accelerator is not built")
async def test_connections_use_the_c_call_server_unless_pure_python_is_forced(tcp_endpoint):
    forced = os.environ.get("POLYRPC_PURE_PYTHON", "") not in ("", "0")
    assert (eager.EagerServer is None) is forced
    reference = type(connection.RpcConnection.on_request.__get__(0))
    expected = reference if forced else eager.EagerServer
    assert await _call_server_in_use(tcp_endpoint) is expected


class Echo:
    async def metadata(self) -> dict:
        return dict(polyrpc.current_context().metadata)


async def test_a_call_with_metadata_is_served_by_the_python_path(tcp_endpoint, monkeypatch):
    """The C call server serves only calls it fully understands: any metadata (here a key
    nothing in polyrpc knows) goes to the Python path, which hands it to the handler."""
    seen: list[dict[str, str]] = []
    reference = connection.RpcConnection.on_request

    def recording(self, frame):
        seen.append(dict(frame.metadata))
        reference(self, frame)

    monkeypatch.setattr(connection.RpcConnection, "on_request", recording)
    metadata = {"x-never-heard-of": "42", "user": "ann"}
    async with conformance.rpc(tcp_endpoint, Echo()) as (_, client, _):
        assert await client.call("Echo.metadata") == {}
        assert await client.call("Echo.metadata", metadata=metadata) == metadata
    assert metadata in seen
    # the plain call is the C server's own when it is built, the reference's otherwise
    assert ({} in seen) is (eager.EagerServer is None)
