"""The ``raw-aiokcp`` benchmark reference row really echoes over aiokcp."""

from __future__ import annotations

import asyncio
import os

import pytest

from polyrpc.bench.raw_aiokcp import RawAiokcpTarget
from polyrpc.bench.targets import Target

pytest.importorskip("aiokcp", reason="pip install aiokcp")


async def test_raw_aiokcp_row_echoes_small_concurrent_and_large_payloads(tmp_path):
    target = RawAiokcpTarget()
    assert isinstance(target, Target)
    assert (target.name, target.kind) == ("raw-aiokcp", "reference")
    assert target.unavailable_reason() is None
    info, stop = await target.serve(tmp_path)
    client = await target.connect(info)
    try:
        assert await client.echo(b"") == b""
        assert await client.echo(b"ping") == b"ping"
        small = [os.urandom(n) for n in range(1, 200)]
        assert await asyncio.gather(*(client.echo(p) for p in small)) == small
        big = os.urandom(1 << 20)
        assert await asyncio.wait_for(client.echo(big), 30) == big
    finally:
        await client.close()
        await stop()
