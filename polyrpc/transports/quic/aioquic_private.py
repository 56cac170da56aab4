"""Every private aioquic attribute the quic transport reads or writes, and a check that they exist.

aioquic has no public API for what these give (pending-work flags, the 1-RTT packet space,
stream send buffers, the receive credit, the peer's certificate), so a new aioquic may drop
or rename one. pyproject pins aioquic to :data:`TESTED_VERSIONS`, the series that
tests/test_quic_aioquic_private.py checks this table against after a real handshake; with any
other aioquic, :func:`unavailable_reason` names what is missing once per process, and the
transport reports itself unavailable instead of failing mid-connection with AttributeError.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender

TESTED_VERSIONS = ">=1.7.2,<1.8"
"""The aioquic versions this table is tested with (pyproject's requirement, kept equal by a test)."""


@dataclass(frozen=True)
class PrivateAttribute:
    """One private aioquic attribute the quic transport relies on: its class, name and use."""

    owner: type
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


_MAY_SEND = "_may_send: work that makes a packet due now (else building one finds nothing)"

PRIVATE_ATTRIBUTES: tuple[PrivateAttribute, ...] = (
    PrivateAttribute(
        QuicConnection,
        "_QuicConnection__frame_handlers",
        "frame-handler table whose epoch sets are shared across connections (~7 KiB each)",
    ),
    PrivateAttribute(
        QuicConnection,
        "_local_max_data",
        "MAX_DATA limit, replaced by ReceiveCredit so that a paused reader stops the peer",
    ),
    PrivateAttribute(
        QuicConnection,
        "_close_event",
        "the peer's close (or a TLS rejection) reported at once, not after the draining period",
    ),
    PrivateAttribute(QuicConnection, "_handshake_confirmed", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_close_pending", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_ping_pending", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_probe_pending", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_streams_blocked_pending", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_handshake_done_pending", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_retire_connection_ids", _MAY_SEND),
    PrivateAttribute(QuicConnection, "_datagrams_pending", _MAY_SEND),
    PrivateAttribute(
        QuicConnection, "_network_paths", _MAY_SEND + ": path challenges, an unvalidated path"
    ),
    PrivateAttribute(QuicConnection, "_host_cids", _MAY_SEND + ": a connection ID not yet sent"),
    PrivateAttribute(
        QuicConnection, "_max_datagram_size", "extra['mtu'] and the size of a batch of small units"
    ),
    PrivateAttribute(
        QuicConnection,
        "_crypto_buffers",
        "TLS output buffers, dropped after the handshake (~30 KiB of RSS per connection)",
    ),
    PrivateAttribute(
        QuicConnection,
        "_idle_timeout",
        "method: the idle timeout named in the lost-connection error",
    ),
    PrivateAttribute(
        QuicConnection,
        "_spaces",
        "the 1-RTT packet space: its ack_at is read (_may_send) and advanced (ACKs ride with data)",
    ),
    PrivateAttribute(
        QuicConnection, "_crypto_streams", "the 1-RTT crypto stream's sender (_may_send: TLS data)"
    ),
    PrivateAttribute(
        QuicConnection,
        "_streams",
        "the sender of each QUIC stream polyrpc opens (unacknowledged bytes, backpressure)",
    ),
    PrivateAttribute(
        QuicConnection,
        "_loss",
        "congestion window and bytes in flight: how much of a large unit to hand over (_top_up)",
    ),
    PrivateAttribute(
        QuicConnection, "_remote_max_data", "the peer's MAX_DATA: the credit that caps _top_up"
    ),
    PrivateAttribute(
        QuicConnection,
        "_remote_max_data_used",
        "bytes sent against the peer's MAX_DATA: the credit that caps _top_up",
    ),
    PrivateAttribute(
        QuicStreamSender,
        "_buffer_start",
        "start of the unacknowledged bytes (write backpressure, the express channel is idle)",
    ),
    PrivateAttribute(
        QuicStreamSender,
        "_buffer_stop",
        "end of the bytes handed over (unacknowledged and unsent bytes, _top_up)",
    ),
    PrivateAttribute(
        tls.Context,
        "_peer_certificate",
        "the server's certificate: extra['peer_cert'], ?fingerprint= pins, kept with tickets",
    ),
)


def missing(
    instances: Mapping[type, object], table: tuple[PrivateAttribute, ...] = PRIVATE_ATTRIBUTES
) -> list[PrivateAttribute]:
    """The entries of ``table`` that the instance given for their owner class lacks."""
    return [entry for entry in table if not hasattr(instances[entry.owner], entry.name)]


def sample_instances() -> dict[type, object]:
    """One fresh instance per owner class, built without I/O (aioquic sets each entry in __init__)."""
    return {
        QuicConnection: QuicConnection(configuration=QuicConfiguration(is_client=True)),
        QuicStreamSender: QuicStreamSender(stream_id=None, writable=True),
        tls.Context: tls.Context(is_client=True),
    }


def reason(instances: Mapping[type, object]) -> str | None:
    """None if ``instances`` have every entry, else a message naming the missing ones."""
    absent = missing(instances)
    if not absent:
        return None
    return _advice(
        f"lacks private attributes the quic transport uses: {', '.join(map(str, absent))}"
    )


def _advice(problem: str) -> str:
    """``problem`` with the installed version, the tested ones and how to get one."""
    return (
        f"aioquic {version('aioquic')} {problem} (tested with aioquic{TESTED_VERSIONS}, see "
        f"polyrpc/transports/quic/aioquic_private.py); "
        f"install a tested one: pip install 'aioquic{TESTED_VERSIONS}'"
    )


@functools.cache
def unavailable_reason() -> str | None:
    """:func:`reason` for the installed aioquic, computed once per process (~1 ms)."""
    try:
        instances = sample_instances()
    except Exception as exc:  # a changed constructor: the transport would fail the same way
        return _advice(f"could not be checked ({type(exc).__name__}: {exc})")
    return reason(instances)
