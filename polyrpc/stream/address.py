"""Transport URLs: ``scheme@host:port?opt=v``, ``scheme://host:port``, ``unix@/path``, bare ``host:port``.

Parsing here is purely syntactic; which options exist is the transport's business
(see :meth:`polyrpc.stream.transport.Transport.parse_options`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, unquote

from ..errors import InvalidAddress

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")

HOSTPORT = "hostport"
"""Address kind of network transports: ``host:port``."""
PATH = "path"
"""Address kind of filesystem transports (unix sockets): ``/path/to.sock``."""
NAME = "name"
"""Address kind of named in-process endpoints: ``mem@name``."""


@dataclass(frozen=True)
class Address:
    """A parsed transport URL. ``target`` holds the path or name for non host:port kinds."""

    scheme: str
    host: str = ""
    port: int = 0
    target: str = ""
    options: dict[str, str] = field(default_factory=dict)
    kind: str = HOSTPORT

    def __str__(self) -> str:
        if self.kind == HOSTPORT:
            host = f"[{self.host}]" if ":" in self.host else self.host
            text = f"{self.scheme}@{host}:{self.port}"
        else:
            text = f"{self.scheme}@{self.target}"
        if self.options:
            query = "&".join(f"{k}={quote(v, safe='/:,.-_')}" for k, v in self.options.items())
            text += "?" + query
        return text

    def with_port(self, port: int) -> Address:
        """The same address with another port (used to report the port a listener bound)."""
        return replace(self, port=port)

    def with_options(self, **options: str) -> Address:
        """The same address with options added or replaced."""
        return replace(self, options={**self.options, **options})

    def without_options(self) -> Address:
        """The same address with no options, e.g. to publish a listener's URL."""
        return replace(self, options={})


def split_scheme(url: str) -> tuple[str, str]:
    """Split ``url`` into (scheme, rest); a bare ``host:port`` is tcp."""
    if not isinstance(url, str):
        raise InvalidAddress(f"a transport URL must be a string, not {type(url).__name__}")
    url = url.strip()
    if not url:
        raise InvalidAddress("empty transport URL; expected e.g. 'tcp@127.0.0.1:9000'")
    if "://" in url:
        scheme, rest = url.split("://", 1)
    else:
        head = url.split("?", 1)[0]
        if "@" in head and _SCHEME.match(head.split("@", 1)[0].lower()):
            scheme, rest = url.split("@", 1)
        else:
            scheme, rest = "tcp", url
    scheme = scheme.lower()
    if not _SCHEME.match(scheme):
        raise InvalidAddress(f"invalid scheme {scheme!r} in {url!r}")
    return scheme, rest


def parse_query(url: str, query: str) -> dict[str, str]:
    """Parse ``a=1&b=2``; repeated or empty option names are errors."""
    options: dict[str, str] = {}
    if not query:
        return options
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise InvalidAddress(f"malformed options {query!r} in {url!r}: {exc}") from None
    for key, value in pairs:
        if key in options:
            raise InvalidAddress(f"option {key!r} given twice in {url!r}")
        options[key] = value
    return options


def parse_hostport(url: str, text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``, checking the port range and a non-empty host."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidAddress(f"unclosed '[' in IPv6 address of {url!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidAddress(f"unexpected {rest!r} after ']' in {url!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise InvalidAddress(f"IPv6 addresses need brackets, e.g. 'tcp@[::1]:9000'; got {url!r}")
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host, port_text = text, None
    if not host:
        raise InvalidAddress(f"empty host in {url!r}; expected host:port, e.g. '127.0.0.1:9000'")
    if port_text is None or port_text == "":
        raise InvalidAddress(
            f"missing port in {url!r}; expected host:port (use port 0 to pick a free port)"
        )
    if not port_text.isdigit():
        raise InvalidAddress(f"port {port_text!r} in {url!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise InvalidAddress(f"port {port} in {url!r} is out of range 0-65535")
    return host, port


def parse_address(url: str, kind: str = HOSTPORT) -> Address:
    """Parse ``url`` for a transport whose addresses are of ``kind``."""
    scheme, rest = split_scheme(url)
    location, _, query = rest.partition("?")
    options = parse_query(url, query)
    location = unquote(location)
    if kind == HOSTPORT:
        host, port = parse_hostport(url, location)
        return Address(scheme, host=host, port=port, options=options, kind=kind)
    if not location:
        what = "socket path" if kind == PATH else "endpoint name"
        raise InvalidAddress(f"empty {what} in {url!r}")
    return Address(scheme, target=location, options=options, kind=kind)
