"""A real ``polyrpc serve`` subprocess for the hostile-peer suite, once per frame decoder
(C and pure Python), listening on tcp, unix, tls, kcp and quic; after every case the server
must be unharmed (it serves a normal call quickly on every transport, its descriptors are
back to their baseline)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from bench import budgets
from polyrpc.wire.frames import ACCELERATED
from tests.adversarial.peers import SCHEMES, Target


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("c", marks=pytest.mark.skipif(not ACCELERATED, reason="no C decoder")),
        "python",
    ],
)
def server(request: pytest.FixtureRequest) -> Iterator[Target]:
    """One server subprocess per decoder for the whole suite."""
    with budgets.serve_demo(
        SCHEMES, pure_python=request.param == "python", objects=["tests.rpc_fault_services:Slow"]
    ) as (proc, urls):
        target = Target(proc.pid, urls, request.param)
        for scheme in SCHEMES:  # the first connection per transport allocates for good
            asyncio.run(target.serves(scheme))
        target.baseline_fds = target.fds()
        yield target


@pytest.fixture
async def target(server: Target) -> AsyncIterator[Target]:
    """The server; after the case it must serve every transport and hold no more descriptors."""
    yield server
    await server.settled()
    for scheme in SCHEMES:
        await server.serves(scheme)
