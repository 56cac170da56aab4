"""The session's sans-IO core driven directly: bytes and time in, bytes, events and timer
deadlines out. No event loop, no sockets, no sleeps: two cores are wired back to back and
the time is a number the test sets."""

from __future__ import annotations

import pytest

from polyrpc.errors import (
    CallTimeout,
    ConnectionLost,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
)
from polyrpc.session.core import (
    ConnectionEnded,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    OnewayReceived,
    PeerClosing,
    PeerFinished,
    ReplyReceived,
    RequestFailed,
    RequestReceived,
    SessionConfig,
    SessionCore,
)
from polyrpc.wire.frames import FLAG_REPLY, Frame, FrameDecoder, Kind, Limits, encode_frame

pytestmark = pytest.mark.usefixtures("impl")  # the C routing decoder and the Python one


class Clock:
    """The time a core reads: whatever the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def events(core: SessionCore) -> list[Event]:
    found = []
    while (event := core.next_event()) is not None:
        found.append(event)
    return found


def sent_frames(core: SessionCore) -> list[Frame]:
    return FrameDecoder().feed(b"".join(bytes(b) for b in core.data_to_send()))


def wire(kind: int, seq: int, payload: bytes = b"", **options) -> bytes:
    """One frame as the bytes a peer sends."""
    return b"".join(bytes(b) for b in encode_frame(kind, seq, payload, **options))


def deliver(source: SessionCore, target: SessionCore) -> None:
    """What ``source`` queued arrives at ``target``, one write per buffer."""
    for buffer in source.data_to_send():
        target.receive_data(bytes(buffer))


def pair(
    clock: Clock,
    *,
    client_options: dict | None = None,
    server_options: dict | None = None,
    **options,
) -> tuple[SessionCore, SessionCore]:
    """A client and a server core, handshaken: ``options`` are both sides' SessionConfig
    options, ``client_options`` and ``server_options`` one side's."""
    client_config = SessionConfig(**options, **(client_options or {}))
    server_config = SessionConfig(**options, **(server_options or {}))
    client = SessionCore(client_config, is_client=True, clock=clock)
    server = SessionCore(server_config, is_client=False, clock=clock)
    client.send_hello()
    deliver(client, server)
    deliver(server, client)
    assert events(client) == [HandshakeCompleted()]
    assert events(server) == [HandshakeCompleted()]
    return client, server


def test_the_handshake_agrees_on_features_and_limits():
    clock = Clock()
    client = SessionCore(SessionConfig(), is_client=True, clock=clock)
    server = SessionCore(
        SessionConfig(limits=Limits(max_frame=1 << 20)), is_client=False, clock=clock
    )
    client.send_hello()
    (hello,) = sent_frames(client)
    assert hello.kind == Kind.HELLO and hello.metadata["codec"] == "msgpack"
    server.receive_data(wire(Kind.HELLO, 0, metadata=hello.metadata))
    assert events(server) == [HandshakeCompleted()]
    assert client.next_event() is None  # nothing until the server's answer arrives
    deliver(server, client)
    assert events(client) == [HandshakeCompleted()]
    assert "cancel" in client.peer_features and client.peer_info["max_frame"] == str(1 << 20)
    with pytest.raises(MessageTooLarge):
        client.begin_request(b"x" * (1 << 20))  # over the server's announced limit


def test_a_request_and_its_reply():
    client, server = pair(Clock())
    seq, _ = client.begin_request({"n": 7}, "Svc.double")
    assert client.in_flight == 1
    deliver(client, server)
    (received,) = events(server)
    assert isinstance(received, RequestReceived)
    assert received.frame.method == "Svc.double" and server.decode(received.frame) == {"n": 7}
    server.respond(received.frame.seq, 14)
    deliver(server, client)
    (reply,) = events(client)
    assert isinstance(reply, ReplyReceived) and reply.frame.seq == seq
    assert client.result(reply.frame) == 14 and client.in_flight == 0


def test_frames_behind_the_hello_are_handled_in_the_same_receive():
    clock = Clock()
    client = SessionCore(SessionConfig(), is_client=True, clock=clock)
    server = SessionCore(SessionConfig(), is_client=False, clock=clock)
    client.send_hello()
    client._handshaken = True  # the client sends its first request before the answer
    client.send_oneway("early")
    server.receive_data(b"".join(bytes(b) for b in client.data_to_send()))
    found = events(server)
    assert found[0] == HandshakeCompleted()
    assert isinstance(found[1], OnewayReceived) and server.decode(found[1].frame) == "early"


def test_a_deadline_fails_the_request_and_cancels_it_at_the_peer():
    clock = Clock()
    client, _ = pair(clock, heartbeat_interval=0, idle_timeout=0)  # the timer is the deadline's
    seq, _ = client.begin_request("slow", "Svc.slow", timeout=1.0)
    (request,) = sent_frames(client)
    assert request.metadata["timeout"] == "1"
    due = client.timer()
    assert due is not None and clock.now + 1.0 <= due <= clock.now + 1.02
    client.handle_timer(clock.now + 0.5)
    assert events(client) == [] and client.in_flight == 1
    clock.now = due
    client.handle_timer(due)
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and failed.seq == seq
    assert isinstance(failed.error, CallTimeout) and "after 1s" in str(failed.error)
    (cancel,) = sent_frames(client)
    assert (cancel.kind, cancel.seq) == (Kind.CANCEL, seq)
    assert client.in_flight == 0 and client.timer() is None


def test_a_reply_before_the_deadline_wins_and_the_expiry_does_nothing():
    clock = Clock()
    client, server = pair(clock)
    client.begin_request("quick", timeout=1.0)
    deliver(client, server)
    (request,) = events(server)
    server.respond(request.frame.seq, "done")
    deliver(server, client)
    assert [type(e) for e in events(client)] == [ReplyReceived]
    client.handle_timer(clock.now + 2)
    assert [e for e in events(client) if isinstance(e, RequestFailed)] == []
    assert all(f.kind != Kind.CANCEL for f in sent_frames(client))


def test_heartbeats_flow_when_idle_and_are_answered():
    clock = Clock()
    client, server = pair(clock)  # heartbeat every 5 s, idle timeout 20 s (the defaults)
    assert client.timer() == clock.now + 5
    clock.now += 5
    client.handle_timer(clock.now)
    (heartbeat,) = sent_frames(client)
    assert heartbeat.kind == Kind.HEARTBEAT and not heartbeat.flags & FLAG_REPLY
    server.receive_data(wire(Kind.HEARTBEAT, 0))
    (answer,) = sent_frames(server)
    assert answer.kind == Kind.HEARTBEAT and answer.flags & FLAG_REPLY
    assert client.timer() == clock.now + 5


def test_a_silent_peer_is_declared_dead_after_the_idle_timeout():
    clock = Clock()
    client, _ = pair(clock)
    client.begin_request("anyone?")
    for _ in range(4):  # every 5 s the peer answers a heartbeat: alive
        clock.now += 5
        client.handle_timer(clock.now)
        client.data_to_send()
        client.receive_data(wire(Kind.HEARTBEAT, 0, flags=FLAG_REPLY))
    assert events(client) == []
    last_data = clock.now
    while client.timer() is not None and clock.now < last_data + 60:  # then silence
        clock.now = client.timer()
        client.handle_timer(clock.now)
    # dead once 20 s pass without data, seen at the next check (every 5 s)
    assert 20 < clock.now - last_data <= 30
    found = events(client)
    assert isinstance(found[0], ConnectionEnded) and "assuming it is dead" in str(found[0].error)
    (failed,) = [e for e in found if isinstance(e, RequestFailed)]
    assert isinstance(failed.error, ConnectionLost) and "assuming it is dead" in str(failed.error)
    with pytest.raises(ConnectionLost, match="assuming it is dead"):
        client.begin_request("too late")
    assert client.timer() is None


def test_a_wrong_token_is_refused_and_both_sides_say_why():
    clock = Clock()
    client = SessionCore(SessionConfig(token="guess"), is_client=True, clock=clock)
    server = SessionCore(SessionConfig(token="s3cret"), is_client=False, clock=clock)
    client.send_hello()
    deliver(client, server)
    refused, ended = events(server)
    assert isinstance(refused, HandshakeFailed) and refused.error.reason == "bad_token"
    assert isinstance(ended, ConnectionEnded)
    deliver(server, client)
    failed, dropped = events(client)
    assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, HandshakeError)
    assert failed.error.reason == "bad_token" and "wrong token" in str(failed.error)
    assert isinstance(dropped, ConnectionEnded)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP"),
        (wire(Kind.REQUEST, 1, b"x"), "REQUEST before HELLO"),
    ],
)
def test_a_protocol_error_is_named_to_the_peer_and_ends_the_connection(data, why):
    server = SessionCore(SessionConfig(), is_client=False, clock=Clock())
    server.receive_data(data)
    found = events(server)
    assert isinstance(found[0], HandshakeFailed)
    assert isinstance(found[-1], ConnectionEnded) and isinstance(found[-1].error, ProtocolError)
    assert why in str(found[-1].error)
    (error,) = sent_frames(server)
    assert (error.kind, error.seq) == (Kind.ERROR, 0)
    assert server.decode(error)["code"] == "protocol_error"
    server.receive_data(wire(Kind.HELLO, 0))  # later input is ignored
    assert events(server) == [] and server.data_to_send() == []


def test_goaway_stops_new_requests_both_ways():
    client, server = pair(Clock())
    client.start_close()
    (goaway,) = sent_frames(client)
    assert goaway.kind == Kind.GOAWAY
    server.receive_data(wire(Kind.GOAWAY, 0))
    assert events(server) == [PeerClosing()]
    with pytest.raises(ConnectionLost, match="peer is closing"):
        server.begin_request("new work")
    with pytest.raises(ConnectionLost, match="is closing"):
        client.begin_request("new work")


def test_end_of_stream_fails_pending_requests_and_says_if_it_was_abandoned():
    client, server = pair(Clock())
    seq, _ = client.begin_request("pending")
    client.eof_received()  # no GOAWAY first: the peer went away
    failed, abandoned, finished = events(client)
    assert isinstance(failed, RequestFailed) and failed.seq == seq
    assert abandoned == PeerFinished(abandoned=True) and finished == PeerFinished(abandoned=False)
    server.receive_data(wire(Kind.GOAWAY, 0))
    events(server)
    server.eof_received()  # after a goodbye: a graceful end
    assert events(server) == [PeerFinished(abandoned=False)]


def test_end_of_stream_in_the_middle_of_a_frame_is_a_protocol_error():
    client, server = pair(Clock())
    client.send_oneway("cut short")
    partial = b"".join(bytes(b) for b in client.data_to_send())[:-3]
    server.receive_data(partial)
    server.eof_received()
    (ended,) = events(server)
    assert isinstance(ended, ConnectionEnded) and "middle of a frame" in str(ended.error)


def test_sequence_numbers_name_each_side_s_exchanges():
    client, server = pair(Clock())
    client_seqs = [client.begin_request(i)[0] for i in range(3)]
    server_seqs = [server.begin_request(i)[0] for i in range(3)]
    assert client_seqs == [1, 3, 5] and server_seqs == [2, 4, 6]
    assert all(client.is_own_seq(s) and not server.is_own_seq(s) for s in client_seqs)
    client.cancel_request(3)
    (cancel,) = sent_frames(client)[3:]
    assert (cancel.kind, cancel.seq) == (Kind.CANCEL, 3) and client.in_flight == 2


def test_abort_fails_everything_pending_once():
    client, _ = pair(Clock())
    client.begin_request("a")
    client.begin_request("b")
    client.abort(ConnectionLost("test is over"))
    found = events(client)
    assert isinstance(found[0], ConnectionEnded)
    assert [type(e) for e in found[1:]] == [RequestFailed, RequestFailed]
    assert all("test is over" in str(e.error) for e in found[1:])
    client.abort()
    assert events(client) == []
