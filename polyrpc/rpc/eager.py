"""Stepping a handler's coroutine by hand, so a call that never waits needs no task.

``coroutine_step`` is the pure-Python reference; the RPC layer's C accelerator
(polyrpc.rpc._callserver) provides the same function without raising StopIteration
for every finished call, and ``EagerServer``, which serves a connection's usual calls
(reference: ``RpcConnection.on_request``). ``POLYRPC_PURE_PYTHON=1`` forces the
references.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any


def _py_coroutine_step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Send None into ``coro``: (True, result) if it finished, (False, yielded) if not."""
    try:
        return False, coro.send(None)
    except StopIteration as done:
        return True, done.value


def _select() -> tuple[Callable[[Coroutine[Any, Any, Any]], tuple[bool, Any]], Any]:
    if os.environ.get("POLYRPC_PURE_PYTHON", "") not in ("", "0"):
        return _py_coroutine_step, None
    try:
        from ._callserver import EagerServer, coroutine_step
    except ImportError:
        return _py_coroutine_step, None
    return coroutine_step, EagerServer


coroutine_step, EagerServer = _select()
"""coroutine_step: the C accelerator and the pure-Python reference step coroutines alike.
EagerServer: the C call server, or None when only the reference is available."""
