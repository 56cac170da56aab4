"""The RPC conformance behaviours once more, served by the pure-Python reference.

Connections normally serve their usual calls with the C accelerator's EagerServer and
hand the rest to ``RpcConnection.on_request``; here every call takes the Python path,
over tcp, so the reference stays correct too.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import pytest

from polyrpc.rpc import connection, eager
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


@pytest.mark.skipif(eager.EagerServer is None, reason="the C accelerator is not built")
async def test_connections_use_the_c_call_server_when_it_is_built(tcp_endpoint):
    assert await _call_server_in_use(tcp_endpoint) is eager.EagerServer
