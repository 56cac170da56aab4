"""The session's routing decoder (polyrpc.session.routing): where received frames go.

Run against both implementations: the pure-Python reference on the Python codec and the C
one (polyrpc.session._routing) on the C codec, with the same inputs and expectations.
"""

from __future__ import annotations

import asyncio

import pytest

from polyrpc import ProtocolError
from polyrpc.session import routing
from polyrpc.wire.frames import PYTHON, Kind
from tests.test_frames import both, normalise, wire


def receive(decoder, data: bytes) -> None:
    """What a socket does: read into get_buffer(), then call received()."""
    view = decoder.get_buffer(len(data))
    view[: len(data)] = data
    del view
    decoder.received(len(data))


@both
def test_received_resolves_leading_replies_and_hands_the_rest_over_in_order(impl):
    loop = asyncio.new_event_loop()
    try:
        answered, later, cancelled = (loop.create_future() for _ in range(3))
        cancelled.cancel()
        replies = {1: answered, 3: later, 5: cancelled}
        batches: list = []
        decoder = routing.for_codec(impl)()
        decoder.route(batches.append, pytest.fail, replies)
        reply = PYTHON.Frame(Kind.RESPONSE, 1, payload=b"one")
        receive(decoder, wire([reply, PYTHON.Frame(Kind.ERROR, 5, payload=b"late")]))
        assert normalise([answered.result()]) == normalise([reply])
        assert replies == {3: later} and batches == []  # a done future is forgotten, not set
        # after another frame, replies stay in order with it; unknown seqs go over too
        request = PYTHON.Frame(Kind.REQUEST, 2, payload=b"q")
        receive(decoder, wire([request, PYTHON.Frame(Kind.RESPONSE, 3), reply]))
        assert not later.done() and 3 in replies
        assert [normalise(batch) for batch in batches] == [
            normalise([request, PYTHON.Frame(Kind.RESPONSE, 3), reply])
        ]
        batches.clear()
        receive(decoder, wire([PYTHON.Frame(Kind.RESPONSE, 9), PYTHON.Frame(Kind.RESPONSE, 3)]))
        assert [normalise(batch) for batch in batches] == [
            normalise([PYTHON.Frame(Kind.RESPONSE, 9), PYTHON.Frame(Kind.RESPONSE, 3)])
        ]
    finally:
        loop.close()


@both
def test_received_leaves_replies_to_python_while_held_or_not_routed(impl):
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        hold = [object()]  # someone waits for a slot: the session must see the reply
        batches: list = []
        decoder = routing.for_codec(impl)()
        decoder.route(batches.append, pytest.fail, {1: future}, hold)
        receive(decoder, wire([PYTHON.Frame(Kind.RESPONSE, 1)]))
        assert len(batches) == 1 and not future.done()
        decoder.route(batches.append, pytest.fail)  # no replies table (before the handshake)
        receive(decoder, wire([PYTHON.Frame(Kind.RESPONSE, 1)]))
        assert len(batches) == 2 and not future.done()
        hold.clear()
        decoder.route(batches.append, pytest.fail, {1: future}, hold)
        receive(decoder, wire([PYTHON.Frame(Kind.RESPONSE, 1)]))
        assert len(batches) == 2 and future.done()
    finally:
        loop.close()


@both
def test_received_reports_protocol_errors_and_counts_bytes(impl):
    decoder = routing.for_codec(impl)()
    with pytest.raises(RuntimeError, match=r"route\(\) first"):
        decoder.received(0)
    with pytest.raises(TypeError, match="callable"):
        decoder.route(None, print)
    errors: list = []
    decoder.route(pytest.fail, errors.append)
    data = wire([PYTHON.Frame(Kind.ONEWAY, 2, payload=b"x" * 10)])
    decoder.feed(data[:5])
    assert decoder.bytes_received == 5
    receive(decoder, b"GET / HTTP/1.1\r\n" + bytes(16))
    assert decoder.bytes_received == 5 + 32
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
    assert decoder.broken is errors[0]


@both
def test_a_lone_request_goes_to_on_request_while_serving_one_is_set(impl):
    decoder = routing.for_codec(impl)()
    served, batches, errors = [], [], []

    def on_request(frame):
        served.append((normalise([frame]), decoder.serving_one))
        if frame.seq == 6:
            raise ProtocolError("bad request")

    decoder.route(batches.append, errors.append, {}, None, on_request)
    request = PYTHON.Frame(Kind.REQUEST, 2, payload=b"q")
    receive(decoder, wire([request]))
    decoder.received_data(wire([PYTHON.Frame(Kind.REQUEST, 4)]))
    assert served == [
        (normalise([request]), True),
        (normalise([PYTHON.Frame(Kind.REQUEST, 4)]), True),
    ]
    assert decoder.serving_one is False and batches == []
    # two requests together, or a lone frame of another kind, are a batch for on_frames
    decoder.received_data(wire([request, request]))
    receive(decoder, wire([PYTHON.Frame(Kind.ONEWAY, 0)]))
    assert [len(batch) for batch in batches] == [2, 1] and len(served) == 2
    # a ProtocolError while serving goes where the decoder's own would
    receive(decoder, wire([PYTHON.Frame(Kind.REQUEST, 6)]))
    assert [str(e) for e in errors] == ["bad request"] and decoder.serving_one is False
    with pytest.raises(TypeError, match="callable"):
        decoder.route(print, print, None, None, 42)
