"""Selectors: which live server gets the next call (``select=`` of the cluster client)."""

from __future__ import annotations

import bisect
import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol


class Candidate(Protocol):
    """What a selector reads of a server."""

    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def latency(self) -> float: ...


class Selector(ABC):
    """Picks one of the live servers (never given an empty list)."""

    @abstractmethod
    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        """The server for the next call; ``key`` is the caller's (used by consistent_hash)."""


class RoundRobin(Selector):
    """Each live server in turn."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class RandomChoice(Selector):
    """A uniformly random live server."""

    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        return random.choice(candidates)


class Weighted(Selector):
    """Smooth weighted round robin (nginx's): over a cycle each server gets calls in
    proportion to its weight, interleaved rather than in bursts."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        total = 0
        best: Candidate | None = None
        for candidate in candidates:
            weight = max(candidate.weight, 0)
            total += weight
            current = self._current.get(candidate.id, 0) + weight
            self._current[candidate.id] = current
            if best is None or current > self._current[best.id]:
                best = candidate
        assert best is not None
        self._current[best.id] -= total
        return best


class ConsistentHash(Selector):
    """The server owning ``key`` on a hash ring (``replicas`` points per unit of weight):
    a key keeps its server while that server lives, and only the keys of a server that
    leaves move."""

    def __init__(self, replicas: int = 64) -> None:
        self.replicas = replicas
        self._ring: tuple[list[int], list[str]] = ([], [])
        self._ring_of: tuple[str, ...] = ()

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def _build(self, candidates: Sequence[Candidate]) -> None:
        points = sorted(
            (self._hash(f"{c.id}#{index}"), c.id)
            for c in candidates
            for index in range(self.replicas * max(c.weight, 1))
        )
        self._ring = ([point for point, _ in points], [owner for _, owner in points])

    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        if key is None:
            raise ValueError("select='consistent_hash' needs a key: call(..., key=...)")
        ids = tuple(sorted(c.id for c in candidates))
        if ids != self._ring_of:
            self._build(candidates)
            self._ring_of = ids
        points, owners = self._ring
        index = bisect.bisect(points, self._hash(key)) % len(points)
        owner = owners[index]
        return next(c for c in candidates if c.id == owner)


class LeastLoaded(Selector):
    """Power of two choices: of two random servers, the one with fewer calls in flight,
    weighted by its recent latency (an idle fast server wins over a busy or slow one)."""

    def pick(self, candidates: Sequence[Candidate], key: str | None) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        first, second = random.sample(list(candidates), 2)
        return min((first, second), key=lambda c: (c.in_flight + 1) * c.latency)


SELECTORS: dict[str, Callable[[], Selector]] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "weighted": Weighted,
    "consistent_hash": ConsistentHash,
    "least_loaded": LeastLoaded,
}


def make_selector(select: str | Selector) -> Selector:
    """A selector from its name (or one given as is)."""
    if isinstance(select, Selector):
        return select
    try:
        return SELECTORS[select]()
    except KeyError:
        choices = ", ".join(SELECTORS)
        raise ValueError(f"unknown selector {select!r}; choose one of {choices}") from None
