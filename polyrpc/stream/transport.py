"""The Transport interface and URL option declarations.

A transport is registered under its scheme (see :mod:`polyrpc.stream.registry`),
declares which URL options it accepts, and turns addresses into streams
(:meth:`Transport.dial`) and listeners (:meth:`Transport.listen`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InvalidAddress, TransportUnavailable
from .address import HOSTPORT, Address, parse_address
from .trait import Listener, Stream, StreamHandler


@dataclass(frozen=True)
class Option:
    """One URL option: how to parse its text, what it means, and its default."""

    parse: Callable[[str], Any]
    help: str
    default: Any = None


def integer(low: int, high: int) -> Callable[[str], int]:
    """A parser for whole numbers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def number(low: float, high: float) -> Callable[[str], float]:
    """A parser for decimal numbers in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def boolean(text: str) -> bool:
    """A parser for 1/0, true/false, yes/no, on/off."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def choice(*values: str) -> Callable[[str], str]:
    """A parser accepting one of ``values``."""

    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"expected one of {', '.join(values)}, got {text!r}")
        return text

    return parse


def existing_file(text: str) -> str:
    """A parser for a path that must name an existing file."""
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text!r}")
    return text


def text(value: str) -> str:
    """A parser accepting any text."""
    return value


class Transport(ABC):
    """A way of moving bytes, selected by the scheme of a URL.

    Subclasses set ``scheme``, ``description``, ``address_kind`` and ``options``
    and implement :meth:`dial` and :meth:`listen`. A transport that cannot work
    on this machine overrides :meth:`unavailable_reason`; one with needs of its own in
    the command line tool sets :attr:`library_loggers` or overrides
    :meth:`development_listen_url`, so the CLI names no scheme.
    """

    scheme: ClassVar[str]
    description: ClassVar[str] = ""
    address_kind: ClassVar[str] = HOSTPORT
    options: ClassVar[Mapping[str, Option]] = {}
    library_loggers: ClassVar[tuple[str, ...]] = ()
    """Loggers of the library this transport drives that log each failure themselves: the
    CLI, which prints one clear line of its own, quiets them."""

    def unavailable_reason(self) -> str | None:
        """None if usable here, else why not and how to fix it (shown by ``polyrpc transports``)."""
        return None

    def check_available(self) -> None:
        """Raise TransportUnavailable with :meth:`unavailable_reason` if there is one."""
        reason = self.unavailable_reason()
        if reason:
            raise TransportUnavailable(f"{self.scheme}: {reason}")

    def parse(self, url: str) -> Address:
        """Parse ``url`` and check its options against :attr:`options`."""
        address = parse_address(url, self.address_kind)
        self.parse_options(address)
        return address

    def parse_options(self, address: Address) -> dict[str, Any]:
        """The typed option values of ``address``, defaults filled in; bad ones raise InvalidAddress."""
        values = {name: option.default for name, option in self.options.items()}
        for name, raw in address.options.items():
            option = self.options.get(name)
            if option is None:
                valid = ", ".join(sorted(self.options)) or "none"
                raise InvalidAddress(
                    f"unknown option {name!r} for {self.scheme}; valid options: {valid}"
                )
            try:
                values[name] = option.parse(raw)
            except ValueError as exc:
                raise InvalidAddress(
                    f"bad value for {self.scheme} option {name!r}: {exc}"
                ) from None
        return values

    @abstractmethod
    async def dial(self, address: Address) -> Stream:
        """Connect to ``address`` and return the stream. Failures raise ConnectionLost."""

    @abstractmethod
    async def listen(self, address: Address, on_stream: StreamHandler) -> Listener:
        """Bind ``address`` (port 0: any free port) and call ``on_stream`` for each peer."""

    def development_listen_url(self, url: str, workdir: Path) -> tuple[str, str | None]:
        """The URL ``polyrpc serve`` listens on for ``url``, and a certificate fingerprint to show.

        A transport that cannot listen without a certificate may add a fresh self-signed one
        (written under ``workdir``) and return its SHA-256 fingerprint, which clients pin
        with ``?fingerprint=``. By default the URL is used as it is (and None).
        """
        return url, None

    def loopback_urls(self, workdir: Path) -> tuple[str, dict[str, str]]:
        """A listen URL on this machine plus the options a client must add to dial it.

        Used by the conformance suite and the benchmark to run every transport the
        same way; ``workdir`` is a private scratch directory (for sockets, certs...).
        """
        return f"{self.scheme}@127.0.0.1:0", {}
