"""A polyrpc echo peer run as its own process, so tests can kill it abruptly.

Usage: python tests/peer.py LISTEN_URL  -> prints the bound URL, then serves until killed.
Requests are answered after the delay given in the message ({"sleep": s}) or at once.
"""

from __future__ import annotations

import asyncio
import sys

import polyrpc


async def answer(message):
    if isinstance(message, dict) and "sleep" in message:
        await asyncio.sleep(message["sleep"])
    return message


async def main(url: str) -> None:
    async def echo_messages(conn: polyrpc.Connection) -> None:
        async for message in conn:
            await conn.send(message)

    listener = await polyrpc.listen(url, echo_messages, on_request=answer)
    print(listener.url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
