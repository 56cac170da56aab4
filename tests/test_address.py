"""URL parsing and option validation (no sockets)."""

from __future__ import annotations

import pytest

import polyrpc
from polyrpc import registry


@pytest.mark.parametrize(
    ("url", "expected_scheme", "host", "port", "options"),
    [
        ("tcp@127.0.0.1:9000", "tcp", "127.0.0.1", 9000, {}),
        ("tcp://localhost:80", "tcp", "localhost", 80, {}),
        ("127.0.0.1:0", "tcp", "127.0.0.1", 0, {}),
        ("example.org:443", "tcp", "example.org", 443, {}),
        ("tcp@[::1]:9000", "tcp", "::1", 9000, {}),
        ("tcp://[fe80::1]:1", "tcp", "fe80::1", 1, {}),
        ("tcp@h:1?keepalive=5", "tcp", "h", 1, {"keepalive": "5"}),
        ("TCP@h:65535", "tcp", "h", 65535, {}),
    ],
)
def test_valid_host_port_urls(url, expected_scheme, host, port, options):
    transport, address = registry.resolve(url)
    assert transport.scheme == expected_scheme
    assert (address.host, address.port, address.options) == (host, port, options)


def test_unix_and_mem_addresses():
    _, address = registry.resolve("unix@/tmp/x.sock")
    assert address.target == "/tmp/x.sock"
    assert str(address) == "unix@/tmp/x.sock"
    _, address = registry.resolve("mem://thing")
    assert address.target == "thing"


def test_round_trip_to_string():
    _, address = registry.resolve("tcp@[::1]:9000?keepalive=7")
    assert str(address) == "tcp@[::1]:9000?keepalive=7"
    assert str(address.without_options()) == "tcp@[::1]:9000"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nope@h:1", r"unknown transport scheme 'nope'; registered: .*mem.*tcp"),
        ("tcp@h:1?color=red", r"unknown option 'color' for tcp; valid options: keepalive"),
        ("tcp@h:1?keepalive=soon", r"bad value for tcp option 'keepalive'"),
        ("tcp@h", r"missing port"),
        ("tcp@h:", r"missing port"),
        ("tcp@h:70000", r"out of range 0-65535"),
        ("tcp@h:-1", r"not a number"),
        ("tcp@h:http", r"not a number"),
        ("tcp@:80", r"empty host"),
        ("tcp@[::1:80", r"unclosed"),
        ("tcp@::1:80", r"IPv6 addresses need brackets"),
        ("", r"empty transport URL"),
        ("unix@", r"empty socket path"),
        ("tcp@h:1?a=1&a=2", r"given twice"),
        ("tls@h:1?ca=/does/not/exist", r"no such file"),
    ],
)
def test_bad_urls_name_the_problem(url, message):
    with pytest.raises(polyrpc.InvalidAddress, match=message):
        registry.resolve(url)


def test_invalid_address_is_a_value_error():
    with pytest.raises(ValueError):
        registry.resolve("tcp@h:99999")
    assert issubclass(polyrpc.InvalidAddress, polyrpc.PolyrpcError)


async def test_dialing_port_zero_is_refused():
    with pytest.raises(polyrpc.InvalidAddress, match="port 0 only works for listening"):
        await polyrpc.dial("tcp@127.0.0.1:0")


async def test_port_zero_listen_reports_the_bound_port():
    listener = await polyrpc.listen("tcp@127.0.0.1:0")
    try:
        assert listener.url.startswith("tcp@127.0.0.1:")
        assert int(listener.url.rsplit(":", 1)[1]) > 0
    finally:
        await listener.close()
