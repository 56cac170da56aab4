"""Payload codecs: msgpack (default), json and raw bytes; pluggable by id and name.

A frame carries its codec id, so a connection can mix them: bytes-like payloads
always travel as ``raw`` (no copy, no encoding), everything else with the
connection's negotiated codec.

Decoding is bounded so that a payload of N bytes cannot cost far more than N: every
length msgpack reads is checked against N, the arrays and maps of payloads of at least
``COUNTED_FROM`` bytes may take at most ``CONTAINER_BYTES`` x N bytes, and nesting stops
at msgpack's 1024 levels (json: the recursion limit). A payload over a bound fails with
:class:`PayloadTooComplex`. Worst cases measured in docs/architecture.md.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import ProtocolError

Bytes = bytes | bytearray | memoryview
_sizeof = sys.getsizeof


class Codec(ABC):
    """Turns Python objects into payload bytes and back."""

    id: int
    name: str

    @abstractmethod
    def encode(self, obj: Any) -> Bytes:
        """The payload for ``obj``; TypeError if it cannot be encoded."""

    @abstractmethod
    def decode(self, data: Bytes) -> Any:
        """The object in ``data``; ProtocolError if the bytes are not valid."""

    @property
    def unchecked(self) -> tuple[Callable[[Any], Bytes], Callable[[Bytes], Any]]:
        """(encode, decode) for hot paths that translate errors themselves: they may
        raise any Exception instead of TypeError and ProtocolError."""
        return self.encode, self.decode


class RawCodec(Codec):
    """Bytes as they are; decoding yields ``bytes``."""

    id, name = 0, "raw"

    def encode(self, obj: Any) -> Bytes:
        if not isinstance(obj, bytes | bytearray | memoryview):
            raise TypeError(
                f"the raw codec sends bytes-like objects only, not {type(obj).__name__}"
            )
        return obj

    def decode(self, data: Bytes) -> Any:
        return data if type(data) is bytes else bytes(data)


class PayloadTooComplex(ProtocolError):
    """A payload would decode to far more objects or nesting than its size allows; only the
    call or message that carried it fails (RemoteError code ``bad_payload``)."""


COUNTED_FROM = 32 << 10
"""msgpack payloads this big count what their arrays and maps take (smaller ones cost
little anyway: at most about 64 bytes of objects per byte, 2 MiB)."""
CONTAINER_BYTES = 32
"""The arrays and maps of a payload of N bytes may take 32 x N bytes (sys.getsizeof): a
list of pairs ``[[1, 2], ...]`` takes 24 x N; an empty map is one byte but a 64-byte dict,
``{0: 0}`` three bytes but a 184-byte dict."""


def _msgpack_unpackb(data: Bytes) -> Any:
    """msgpack.unpackb with every length bounded by the payload's size and, for big
    payloads, the number of arrays and maps too (see BYTES_PER_CONTAINER)."""
    size = len(data)
    # str as str (raw=False) is msgpack 1.0's default; maps may have any hashable keys
    bounds = {
        "strict_map_key": False,
        "max_str_len": size,
        "max_bin_len": size,
        "max_array_len": size,
        "max_map_len": size // 2,
        "max_ext_len": size,
    }
    try:
        if size < COUNTED_FROM:
            return msgpack.unpackb(data, **bounds)
        left = size * CONTAINER_BYTES

        def count(container: Any) -> Any:
            nonlocal left
            left -= _sizeof(container)
            if left < 0:
                raise PayloadTooComplex(
                    f"msgpack payload of {size} bytes decodes to more than "
                    f"{size * CONTAINER_BYTES} bytes of arrays and maps "
                    f"(the limit is {CONTAINER_BYTES} per payload byte)"
                )
            return container

        return msgpack.unpackb(data, **bounds, list_hook=count, object_hook=count)
    except msgpack.StackError:
        raise PayloadTooComplex(
            f"msgpack payload of {size} bytes is nested too deeply (limit 1024 levels)"
        ) from None


class MsgpackCodec(Codec):
    """msgpack with bin/str distinction; tuples arrive as lists."""

    id, name = 1, "msgpack"

    def __init__(self) -> None:
        self._packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    @property
    def unchecked(self) -> tuple[Callable[[Any], Bytes], Callable[[Bytes], Any]]:
        return self._packb, _msgpack_unpackb

    def encode(self, obj: Any) -> Bytes:
        try:
            return self._packb(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"cannot encode {type(obj).__name__} with msgpack: {exc}") from None

    def decode(self, data: Bytes) -> Any:
        try:
            return _msgpack_unpackb(data)
        except PayloadTooComplex:
            raise
        except Exception as exc:
            raise ProtocolError(f"undecodable msgpack payload: {exc}") from None


class JsonCodec(Codec):
    """UTF-8 JSON; handy for debugging and non-Python peers."""

    id, name = 2, "json"

    def encode(self, obj: Any) -> Bytes:
        try:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot encode {type(obj).__name__} as JSON: {exc}") from None

    def decode(self, data: Bytes) -> Any:
        try:
            return json.loads(bytes(data))
        except ValueError as exc:
            raise ProtocolError(f"undecodable JSON payload: {exc}") from None
        except RecursionError:
            raise PayloadTooComplex(
                f"JSON payload of {len(data)} bytes is nested too deeply"
            ) from None


RAW = RawCodec()
_by_id: dict[int, Codec] = {}
_by_name: dict[str, Codec] = {}


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available by its id (on the wire) and name (in options)."""
    if not 0 <= codec.id <= 255:
        raise ValueError("codec ids are one byte (0-255)")
    _by_id[codec.id] = codec
    _by_name[codec.name] = codec


for _codec in (RAW, MsgpackCodec(), JsonCodec()):
    register_codec(_codec)


def codec_by_name(name: str) -> Codec:
    """The codec called ``name``; ValueError listing the valid names otherwise."""
    try:
        return _by_name[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; available: {', '.join(sorted(_by_name))}"
        ) from None


def codec_by_id(codec_id: int) -> Codec:
    """The codec with wire id ``codec_id``; ProtocolError if there is none."""
    try:
        return _by_id[codec_id]
    except KeyError:
        raise ProtocolError(f"frame uses unknown codec id {codec_id}") from None


def codec_names() -> list[str]:
    """Names of every registered codec."""
    return sorted(_by_name)
