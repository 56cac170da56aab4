"""Deadlines checked in batches: one timer per connection, not one per request (sans-IO)."""

from __future__ import annotations

import heapq
import math

GRANULARITY = 0.01
"""Deadlines are rounded up to this many seconds, so requests share expiry checks."""


class DeadlineWheel:
    """Groups keys by deadline tick; :meth:`expire` returns every key whose tick has passed."""

    def __init__(self, granularity: float = GRANULARITY) -> None:
        self.granularity = granularity
        self._buckets: dict[int, list[int]] = {}
        self._ticks: list[int] = []

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, key: int, deadline: float) -> bool:
        """Track ``key`` until ``deadline``; True if this is a new earliest tick (re-arm the timer)."""
        tick = math.ceil(deadline / self.granularity)
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.append(key)
            return False
        self._buckets[tick] = [key]
        heapq.heappush(self._ticks, tick)
        return self._ticks[0] == tick

    def next_deadline(self) -> float | None:
        """When the earliest bucket expires, or None if nothing is tracked."""
        return self._ticks[0] * self.granularity if self._ticks else None

    def expire(self, now: float) -> list[int]:
        """Remove and return the keys of every bucket due at ``now``.

        Keys whose work already finished are returned too; the caller skips them
        (cheaper than removing each key on completion).
        """
        due: list[int] = []
        limit = now / self.granularity
        while self._ticks and self._ticks[0] <= limit:
            due += self._buckets.pop(heapq.heappop(self._ticks))
        return due
