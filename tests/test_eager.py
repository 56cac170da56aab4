"""coroutine_step: the C accelerator and the pure-Python reference step coroutines alike."""

from __future__ import annotations

import asyncio
import os

import pytest

from polyrpc.rpc import eager

IMPLEMENTATIONS = [eager._py_coroutine_step]
try:
    from polyrpc.rpc._callserver import coroutine_step as _c_step
except ImportError:  # the C accelerator is optional; the reference is always tested
    pass
else:
    IMPLEMENTATIONS.append(_c_step)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.__module__)
def step(request):
    return request.param


async def _returns(value):
    return value


async def _raises():
    raise KeyError("boom")


async def _suspends(future):
    return await future


def test_a_coroutine_that_finishes_gives_its_result(step):
    assert step(_returns([1, "x"])) == (True, [1, "x"])
    assert step(_returns(None)) == (True, None)


def test_a_coroutine_that_raises_propagates_the_exception(step):
    with pytest.raises(KeyError, match="boom"):
        step(_raises())


def test_a_coroutine_that_suspends_gives_what_it_yielded_and_can_be_resumed(step):
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        coro = _suspends(future)
        finished, yielded = step(coro)
        assert finished is False and yielded is future
        future.set_result(7)
        assert step(coro) == (True, 7)
    finally:
        loop.close()


def test_the_accelerated_step_is_in_use_unless_pure_python_is_forced():
    forced = os.environ.get("POLYRPC_PURE_PYTHON", "") not in ("", "0")
    expected = IMPLEMENTATIONS[0] if forced else IMPLEMENTATIONS[-1]
    assert eager.coroutine_step is expected
