"""The private aioquic attributes the quic transport uses: present, all listed, and guarded.

Run this file first when trying a new aioquic: it names every private attribute that the
new version lacks (see polyrpc/transports/quic/aioquic_private.py and docs/transports/quic.md).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender
from packaging.specifiers import SpecifierSet
from quic_helpers import Sink, dial, serving

from polyrpc.errors import TransportUnavailable
from polyrpc.stream.registry import registry
from polyrpc.transports.quic import QuicStream, QuicTransport, aioquic_private
from polyrpc.transports.quic.aioquic_private import (
    PRIVATE_ATTRIBUTES,
    TESTED_VERSIONS,
    reason,
    sample_instances,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    path
    for path in sorted((ROOT / "polyrpc/transports/quic").glob("*.py"))
    if path.name != "aioquic_private.py"
] + [ROOT / "polyrpc/bench/raw_aioquic.py"]
"""The code that talks to aioquic objects (the table itself is left out)."""
PRIVATE_NAME = re.compile(r"\.(_[A-Za-z]\w*)")
RECEIVER = re.compile(r"[\w.]*(?:\(\))?$")
PRIVATE_GETATTR = re.compile(r"getattr\([^,]+,\s*\"(_[A-Za-z]\w*)\"")
OWN_NAME = re.compile(r"(?:\bself\.|\bdef |\bclass |^)(_[A-Za-z]\w*)\s*[:=(]", re.MULTILINE)
RELATIVE_IMPORT = re.compile(r"\s*from \.")
"""polyrpc's own modules (``from .._shared.udp import ...``), never aioquic's."""


def private_names_used() -> dict[str, str]:
    """Private names the sources reach on objects that are not their own: name -> first place.

    The heuristic: ``x._name`` (``x`` not ``self``, ``cls`` or ``super()``) and
    ``getattr(x, "_name", ...)``, minus the private names these sources define themselves
    (``self._name =``, ``def _name``, ``class _Name``, module-level ``_name =``). What is left
    is reached on aioquic's objects: every such name must be in the table.
    """
    texts = {path: path.read_text() for path in SOURCES}
    own = {name for text in texts.values() for name in OWN_NAME.findall(text)}
    used: dict[str, str] = {}
    for path, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if RELATIVE_IMPORT.match(line):
                continue
            names = PRIVATE_GETATTR.findall(line)
            for match in PRIVATE_NAME.finditer(line):
                receiver = RECEIVER.search(line[: match.start()])
                if receiver is None or receiver.group() not in ("self", "cls", "super()"):
                    names.append(match.group(1))
            for name in names:
                if name not in own:
                    used.setdefault(name, f"{path.relative_to(ROOT)}:{number}")
    return used


@pytest.fixture
def fresh_check() -> Iterator[None]:
    """The once-per-process check recomputed for this test, and again after it."""
    aioquic_private.unavailable_reason.cache_clear()
    yield
    aioquic_private.unavailable_reason.cache_clear()


def test_the_pin_is_the_tested_series() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"aioquic{TESTED_VERSIONS}" in project["dependencies"]
    assert version("aioquic") in SpecifierSet(TESTED_VERSIONS)


def test_the_table_lists_every_private_name_the_sources_use() -> None:
    used = private_names_used()
    listed = {entry.name for entry in PRIVATE_ATTRIBUTES}
    unlisted = {name: place for name, place in used.items() if name not in listed}
    assert not unlisted, f"private aioquic names missing from aioquic_private.py: {unlisted}"
    unused = listed - used.keys()
    assert not unused, f"aioquic_private.py lists names no source uses: {sorted(unused)}"


def test_the_installed_aioquic_has_every_entry(fresh_check: None) -> None:
    assert QuicTransport().unavailable_reason() is None
    assert registry.get("quic").unavailable_reason() is None


async def test_every_entry_exists_after_a_real_handshake(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, cert):
        client = await dial(server.listener.address.port, f"ca={cert}")
        client_sink = Sink()
        client.set_receiver(client_sink)
        await client.send([b"ping"])
        stream, sink = await server.first()
        await sink.wait_for(4)
        await stream.send([b"pong"])
        await client_sink.wait_for(4)
        for side in (client, stream):
            assert (problem := reason(_instances(side))) is None, problem
        await client.close()


def _instances(stream: QuicStream) -> dict[type, object]:
    """The aioquic objects behind one established polyrpc quic stream, by class."""
    connection = stream.connection
    return {
        QuicConnection: connection,
        tls.Context: connection.tls,
        QuicStreamSender: next(iter(stream._sending.values())),  # the ordered channel's
    }


def test_the_check_names_each_missing_attribute() -> None:
    instances = sample_instances()
    assert reason(instances) is None
    del instances[QuicConnection]._loss
    del instances[QuicStreamSender]._buffer_stop
    problem = reason(instances)
    assert problem is not None
    assert "aioquic.quic.connection.QuicConnection._loss" in problem
    assert "aioquic.quic.stream.QuicStreamSender._buffer_stop" in problem
    assert "_buffer_start" not in problem
    assert f"aioquic{TESTED_VERSIONS}" in problem
    assert version("aioquic") in problem


async def test_a_missing_method_makes_the_transport_unavailable(
    monkeypatch: pytest.MonkeyPatch, fresh_check: None
) -> None:
    monkeypatch.delattr(QuicConnection, "_idle_timeout")
    problem = QuicTransport().unavailable_reason()
    assert problem is not None and "QuicConnection._idle_timeout" in problem
    missing = r"quic: .*QuicConnection\._idle_timeout"
    with pytest.raises(TransportUnavailable, match=missing):
        registry.resolve("quic@127.0.0.1:4433")
    transport = QuicTransport()
    with pytest.raises(TransportUnavailable, match=missing):
        await transport.dial(transport.parse("quic@127.0.0.1:4433"))
