"""Services: plain Python objects and functions exposed as ``Service.method``, plus call stats."""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RemoteError

LATENCY_SAMPLES = 2048
"""Recent call durations kept per method for the p50/p99 in ``_sys.stats``."""


@dataclass(slots=True)
class MethodStats:
    """Per-method counters for ``_sys.stats``."""

    calls: int = 0
    errors: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.durations)
        count = len(ordered)

        def pct(p: float) -> float | None:
            return round(ordered[min(count - 1, int(p * count))] * 1e6, 1) if count else None

        return {"calls": self.calls, "errors": self.errors, "p50_us": pct(0.5), "p99_us": pct(0.99)}

    def record(self, duration: float, failed: bool) -> None:
        """Count one finished call that took ``duration`` seconds."""
        self.calls += 1
        self.errors += failed
        self.durations.append(duration)


@dataclass(slots=True)
class Method:
    """One callable exposed to peers."""

    name: str
    func: Callable[..., Any]
    signature: inspect.Signature | None
    kind: str
    """``async`` (coroutine function), ``stream`` (async generator) or ``sync``."""
    doc: str
    stats: MethodStats = field(default_factory=MethodStats)

    @classmethod
    def wrap(cls, name: str, func: Callable[..., Any]) -> Method:
        if inspect.isasyncgenfunction(func):
            kind = "stream"
        elif inspect.iscoroutinefunction(func):
            kind = "async"
        else:
            kind = "sync"
        try:
            signature = inspect.signature(func, eval_str=True)
        except (NameError, SyntaxError):  # annotations naming things not importable here
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        doc = inspect.getdoc(func) or ""
        return cls(name, func, signature, kind, doc)

    def binding_error(self, args: list, kwargs: dict) -> RemoteError | None:
        """RemoteError(TypeError) if the arguments do not fit the signature, else None.

        Checked only after a call raised TypeError: binding up front costs more than
        the call itself.
        """
        if self.signature is None:
            return None
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return RemoteError("TypeError", f"{self.name}{self.signature}: {exc}", "bad_arguments")
        return None

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "signature": f"{self.name}{self.signature}" if self.signature else self.name,
            "kind": self.kind,
            "doc": self.doc,
        }


class ServiceRegistry:
    """The methods one side exposes, by full name (``Arith.mul``)."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}
        self.started = time.time()

    def register(self, obj: Any, name: str | None = None) -> list[str]:
        """Expose ``obj``'s public methods as ``Name.method`` (a function as ``name``)."""
        if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
            full = name or obj.__name__
            self._add(full, obj)
            return [full]
        if isinstance(obj, type):
            raise TypeError(f"register an instance of {obj.__name__}, not the class itself")
        service = name or type(obj).__name__
        if not service or "." in service:
            raise ValueError(f"invalid service name {service!r} (no dots)")
        added = []
        for attr in dir(obj):
            if attr.startswith("_"):
                continue
            member = getattr(obj, attr)
            if callable(member) and not isinstance(member, type):
                added.append(self._add(f"{service}.{attr}", member))
        if not added:
            raise ValueError(f"{service} has no public methods to expose")
        return added

    def _add(self, full: str, func: Callable[..., Any]) -> str:
        if full in self.methods:
            raise ValueError(f"{full} is already registered")
        self.methods[full] = Method.wrap(full, func)
        return full

    def lookup(self, name: str) -> Method:
        """The method called ``name``; RemoteError naming what exists otherwise."""
        method = self.methods.get(name)
        if method is not None:
            return method
        service, _, _ = name.rpartition(".")
        siblings = sorted(m for m in self.methods if m.rpartition(".")[0] == service)
        if service and siblings:
            raise RemoteError(
                "LookupError",
                f"unknown method {name!r}; {service} has: {', '.join(siblings)}",
                "unknown_method",
            )
        services = sorted({m.rpartition(".")[0] or m for m in self.methods})
        raise RemoteError(
            "LookupError",
            f"unknown method {name!r}; available services: {', '.join(services) or 'none'}",
            "unknown_method",
        )

    @property
    def stats(self) -> dict[str, MethodStats]:
        """Each method's counters, by full name."""
        return {name: method.stats for name, method in self.methods.items()}

    def describe(self) -> list[dict[str, str]]:
        return [self.methods[name].describe() for name in sorted(self.methods)]
