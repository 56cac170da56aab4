"""Which rows the benchmark can run: polyrpc transports and the reference implementations."""

from __future__ import annotations

import importlib

from ..stream.registry import registry
from .targets import MessageTarget, RpcTarget, Target

REFERENCES: dict[str, str] = {
    "raw-asyncio": "polyrpc.bench.raw_asyncio:RawAsyncio",
    "raw-aioquic": "polyrpc.bench.raw_aioquic:RawAioquic",
    "raw-aiokcp": "polyrpc.bench.raw_aiokcp:RawAiokcpTarget",
}
"""Hand-written baselines, measured in the same run as polyrpc's rows."""

IN_PROCESS = {"mem"}
"""Transports that cannot cross processes, so the benchmark leaves them out."""


MIDDLEWARE_SIDES = {
    "+mw": ("server", "client"),
    "+mw=server": ("server",),
    "+mw=client": ("client",),
}
"""Row suffixes of ``SCHEME/rpc`` that install one pass-through middleware on those sides."""


def resolve_target(name: str) -> Target:
    """The Target for a row name: a reference, ``SCHEME`` (message core), ``SCHEME/rpc``, or
    ``SCHEME/rpc`` with a :data:`MIDDLEWARE_SIDES` suffix (not among the default rows)."""
    if name in REFERENCES:
        module, _, attr = REFERENCES[name].partition(":")
        return getattr(importlib.import_module(module), attr)()
    if name in registry.schemes():
        return MessageTarget(name)
    scheme, _, api = name.partition("/")
    api, plus, suffix = api.partition("+")
    sides = MIDDLEWARE_SIDES.get(plus + suffix, ()) if plus else ()
    if api == "rpc" and scheme in registry.schemes() and (sides or not plus):
        return RpcTarget(scheme, middleware_on=sides)
    raise ValueError(f"unknown benchmark row {name!r}; known: {', '.join(default_rows(True))}")


def default_rows(include_unusable: bool = False) -> list[str]:
    """Every row name: usable transports first, then the references."""
    schemes = [
        row.scheme
        for row in registry.describe()
        if row.scheme not in IN_PROCESS and (include_unusable or row.usable)
    ]
    return schemes + [f"{scheme}/rpc" for scheme in schemes] + list(REFERENCES)


REFERENCE_FOR = {"quic": "raw-aioquic", "kcp": "raw-aiokcp"}
"""Which reference row each transport's ratio is taken against (default raw-asyncio)."""


def reference_for(row: str) -> str | None:
    """The reference row ``row`` is compared with, or None for the references themselves."""
    if row in REFERENCES:
        return None
    return REFERENCE_FOR.get(row.partition("/")[0], "raw-asyncio")
