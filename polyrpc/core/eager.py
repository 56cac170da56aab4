"""Stepping a handler's coroutine by hand, so a call that never waits needs no task.

``coroutine_step`` is the pure-Python reference; the C accelerator
(polyrpc.core._frames) provides the same function without raising StopIteration
for every finished call. ``POLYRPC_PURE_PYTHON=1`` forces the reference.
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


def _select() -> Callable[[Coroutine[Any, Any, Any]], tuple[bool, Any]]:
    if os.environ.get("POLYRPC_PURE_PYTHON", "") not in ("", "0"):
        return _py_coroutine_step
    try:
        from ._frames import coroutine_step
    except ImportError:
        return _py_coroutine_step
    return coroutine_step


coroutine_step = _select()
