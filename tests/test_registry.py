"""The transport registry: built-ins, entry-point plugins, unavailable transports."""

from __future__ import annotations

import sys
import textwrap

import pytest

import polyrpc
from polyrpc.stream.registry import Registry


def test_builtins_are_listed_and_usable():
    rows = {row.scheme: row for row in Registry().describe()}
    for scheme in ("tcp", "tls", "unix", "mem"):
        assert rows[scheme].usable, rows[scheme].reason
        assert rows[scheme].source == "built-in"


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A real installed-distribution layout declaring two polyrpc.transports entry points."""
    package = tmp_path / "demo_plugin.py"
    package.write_text(
        textwrap.dedent(
            """
            from polyrpc.transports.tcp import TcpTransport
            from polyrpc.stream.transport import Transport

            class EchoTcp(TcpTransport):
                scheme = "etcp"
                description = "tcp under another name"

            class Broken(TcpTransport):
                scheme = "broken"
                def unavailable_reason(self):
                    return "needs the frobnicator; install it with 'apt install frob'"
            """
        )
    )
    dist = tmp_path / "demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[polyrpc.transports]\n"
        "etcp = demo_plugin:EchoTcp\n"
        "broken = demo_plugin:Broken\n"
        "missing = demo_plugin_absent:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("demo_plugin", None)


def test_entry_point_plugins_are_found(plugin_dist):
    registry = Registry()
    rows = {row.scheme: row for row in registry.describe()}
    assert rows["etcp"].usable and rows["etcp"].source == "plugin"
    assert not rows["broken"].usable
    assert "frobnicator" in rows["broken"].reason
    assert not rows["missing"].usable
    assert "demo_plugin_absent" in rows["missing"].reason
    with pytest.raises(polyrpc.TransportUnavailable, match="frobnicator"):
        registry.resolve("broken@h:1")
    transport, address = registry.resolve("etcp@127.0.0.1:5")
    assert transport.scheme == "etcp" and address.port == 5


async def test_plugin_transport_carries_messages(plugin_dist, monkeypatch):
    registry = Registry()
    monkeypatch.setattr("polyrpc.messages.registry", registry)
    listener = await polyrpc.listen("etcp@127.0.0.1:0", on_request=lambda m: m * 2)
    try:
        async with await polyrpc.dial(listener.url) as conn:
            assert await conn.request(21) == 42
            assert conn.transport == "etcp"
    finally:
        await listener.close()
