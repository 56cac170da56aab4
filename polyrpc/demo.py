"""The demo service ``polyrpc serve URL --demo`` exposes as ``Demo``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class Demo:
    """Small methods for trying polyrpc from the command line."""

    async def echo(self, value: Any) -> Any:
        """Return ``value`` unchanged."""
        return value

    async def add(self, a: Any, b: Any) -> Any:
        """Return ``a + b``."""
        return a + b

    async def sleep(self, seconds: float) -> float:
        """Sleep ``seconds`` (at most an hour), then return them."""
        await asyncio.sleep(min(float(seconds), 3600.0))
        return seconds

    async def count(self, n: int, interval: float = 0.0) -> AsyncIterator[int]:
        """Stream the numbers 0 .. n-1, optionally ``interval`` seconds apart."""
        for i in range(int(n)):
            yield i
            if interval:
                await asyncio.sleep(interval)
