"""Per-server health: reconnect backoff and the circuit breaker."""

from __future__ import annotations

import random
import time


class Backoff:
    """Exponential delays between reconnect attempts, capped and jittered (each delay is
    drawn between half and all of ``initial * 2**attempt``, so clients that lost the same
    server do not come back in step)."""

    def __init__(self, initial: float = 0.05, cap: float = 5.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the one after."""
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """An attempt succeeded: start again from ``initial``."""
        self.attempt = 0


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures: the server gets no calls until a
    probe succeeds. Open for ``reset_after`` seconds, then half-open: the next probe
    decides (success closes it; failure opens it again for twice as long, up to ``cap``)."""

    def __init__(self, threshold: int = 5, reset_after: float = 1.0, cap: float = 30.0) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self.cap = cap
        self.failures = 0
        self.opened_at: float | None = None
        self._open_for = reset_after

    @property
    def state(self) -> str:
        """``closed`` (calls go through), ``open`` (none do) or ``half_open`` (probe due)."""
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at >= self._open_for:
            return "half_open"
        return "open"

    @property
    def wait(self) -> float:
        """Seconds until the open breaker turns half-open (0 when it is not open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self._open_for - time.monotonic())

    def record_success(self) -> None:
        """A call or probe succeeded: close."""
        self.failures = 0
        self.opened_at = None
        self._open_for = self.reset_after

    def record_failure(self) -> bool:
        """A call, connect or probe failed; True if this opened the breaker."""
        self.failures += 1
        if self.opened_at is not None:  # a failed half-open probe: open again, for longer
            self._open_for = min(self.cap, self._open_for * 2)
            self.opened_at = time.monotonic()
            return False
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            return True
        return False
