"""The raw-aioquic reference row: aioquic's own stream API echoes, concurrently and in order."""

from __future__ import annotations

import asyncio

from polyrpc.bench.raw_aioquic import RawAioquic
from polyrpc.bench.targets import Target


async def test_raw_aioquic_row_echoes(tmp_path) -> None:
    target = RawAioquic()
    assert isinstance(target, Target)
    assert (target.name, target.kind) == ("raw-aioquic", "reference")
    info, stop = await target.serve(tmp_path)
    try:
        client = await target.connect(info)
        payloads = [bytes([i % 256]) * (i * 997) for i in range(64)]
        payloads.append(b"z" * (2 << 20))
        replies = await asyncio.wait_for(asyncio.gather(*(client.echo(p) for p in payloads)), 60)
        assert replies == payloads
        await client.close()
    finally:
        await stop()
