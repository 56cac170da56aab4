"""Payload codecs: msgpack (default), json and raw bytes; pluggable by id and name.

A frame carries its codec id, so a connection can mix them: bytes-like payloads
always travel as ``raw`` (no copy, no encoding), everything else with the
connection's negotiated codec.

Decoding is bounded so that a payload of N bytes cannot cost far more than N: every
length msgpack reads is checked against N, and a payload of at least ``COUNTED_FROM``
bytes is first walked once without building anything (:func:`msgpack_counts`,
:func:`json_counts`, in C when the accelerator is built) to count the arrays and maps
it would decode to; if they would take more than ``MSGPACK_BUDGET`` (json:
``JSON_BUDGET``) x N bytes the payload is refused before it is decoded. Nesting stops at
msgpack's 1024 levels (json: the recursion limit). A payload over a bound fails with
:class:`PayloadTooComplex`. Worst cases measured in docs/architecture.md.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import ProtocolError
from . import frames

Bytes = bytes | bytearray | memoryview


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


def decode_error_code(exc: ProtocolError) -> str:
    """The RemoteError code answering a request whose payload did not decode."""
    return "bad_payload" if isinstance(exc, PayloadTooComplex) else "bad_request"


COUNTED_FROM = 32 << 10
"""Payloads this big are walked and their arrays and maps counted before decoding (a
smaller one costs little anyway: at most about 64 bytes of objects per byte, 2 MiB)."""
MSGPACK_BUDGET = 32
"""The arrays and maps of a msgpack payload of N bytes may take 32 x N bytes: a list of
pairs ``[[1, 2], ...]`` takes 27 x N; an empty map is one byte but a 64-byte dict,
``{0: 0}`` three bytes but a 224-byte dict."""
JSON_BUDGET = 20
"""JSON spells the same data in about twice the bytes, so its bound is lower: pairs take
13 x N, records ``{"id": 1, "name": "bob"}`` 12 x N, but ``[{}, ...]`` 24 x N (refused)."""


def container_bytes(arrays: int, elements: int, maps: int, nonempty: int, entries: int) -> int:
    """Upper bound on what these arrays (with ``elements`` items in all) and maps (``nonempty``
    of them not empty, ``entries`` pairs in all) take once decoded (CPython 3.11+ sizes)."""
    return 56 * arrays + 8 * elements + 64 * maps + 104 * nonempty + 56 * entries


_MSGPACK_SCALAR = b"|".join(
    [rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]+"]  # a run of one-byte items
    + [re.escape(bytes([0xA0 + n])) + b".{%d}" % n for n in range(32)]  # fixstr
    + [
        b"[%s].{%d}" % (b"".join(re.escape(bytes([t])) for t in types), size)
        for types, size in (
            ((0xCC, 0xD0), 1),
            ((0xCD, 0xD1, 0xD4), 2),
            ((0xD5,), 3),
            ((0xCA, 0xCE, 0xD2), 4),
            ((0xD6,), 5),
            ((0xCB, 0xCF, 0xD3), 8),
            ((0xD7,), 9),
            ((0xD8,), 17),
        )
    ]
)
"""Items that are neither arrays, maps nor variable-length strings, binaries or exts."""
_MSGPACK_SCALARS = re.compile(_MSGPACK_SCALAR, re.DOTALL)
_MSGPACK_FIXED_CONTAINERS = re.compile(rb"[\x80-\x9f]{2,}")
"""A run of one-byte array and map headers (``[{}, {}, ...]``): counted without a search."""
_MSGPACK_CHUNK = re.compile(b"(?:[\x80-\x9f]+|" + _MSGPACK_SCALAR + b"){1,4096}", re.DOTALL)
"""Up to 4096 runs of one-byte arrays and maps or of scalars: removing the scalars of one
chunk at a time leaves its array and map headers, and keeps ``re.sub``'s list small."""
_NOT_FIXMAP = bytes(b for b in range(256) if not 0x80 <= b <= 0x8F)
_NOT_FIXARRAY = bytes(b for b in range(256) if not 0x90 <= b <= 0x9F)
_FIXMAP_LEN = bytes(b - 0x80 if 0x80 <= b <= 0x8F else 0 for b in range(256))
_FIXARRAY_LEN = bytes(b - 0x90 if 0x90 <= b <= 0x9F else 0 for b in range(256))
_MSGPACK_SIZED = {  # type byte: (length bytes, extra bytes, 0 data / 1 array / 2 map)
    0xC4: (1, 0, 0), 0xD9: (1, 0, 0), 0xC5: (2, 0, 0), 0xDA: (2, 0, 0),
    0xC6: (4, 0, 0), 0xDB: (4, 0, 0), 0xC7: (1, 1, 0), 0xC8: (2, 1, 0), 0xC9: (4, 1, 0),
    0xDC: (2, 0, 1), 0xDD: (4, 0, 1), 0xDE: (2, 0, 2), 0xDF: (4, 0, 2),
}  # fmt: skip


def msgpack_counts(data: Bytes) -> tuple[int, int, int, int, int]:
    """(arrays, array elements, maps, non-empty maps, map entries) in msgpack ``data``,
    found in one walk that builds nothing; a malformed or truncated item ends the walk.
    Reference for the C accelerator's ``msgpack_counts``."""
    data = data if type(data) is bytes else bytes(data)
    arrays = elements = maps = nonempty = entries = 0
    end, i = len(data), 0
    while i < end:
        # a run of one-byte arrays and maps is all headers; a chunk keeps only its headers
        chunk = _MSGPACK_FIXED_CONTAINERS.match(data, i) or _MSGPACK_CHUNK.match(data, i)
        if chunk is not None:
            headers = chunk.group()
            if chunk.re is _MSGPACK_CHUNK:
                headers = _MSGPACK_SCALARS.sub(b"", headers)
            arrays += len(headers.translate(None, _NOT_FIXARRAY))
            elements += sum(headers.translate(_FIXARRAY_LEN))
            map_headers = headers.translate(None, _NOT_FIXMAP)
            maps += len(map_headers)
            nonempty += len(map_headers) - map_headers.count(0x80)
            entries += sum(map_headers.translate(_FIXMAP_LEN))
            i = chunk.end()
            continue
        sized = _MSGPACK_SIZED.get(data[i])
        if sized is None:  # 0xc1, or a string or fixed-size item cut short
            break
        lenbytes, extra, kind = sized
        if end - i - 1 < lenbytes:
            break
        length = int.from_bytes(data[i + 1 : i + 1 + lenbytes], "big")
        if kind == 1:
            arrays, elements = arrays + 1, elements + length
        elif kind == 2:
            maps, nonempty, entries = maps + 1, nonempty + (length != 0), entries + length
        else:
            i += extra + length
        i += 1 + lenbytes
    return arrays, elements, maps, nonempty, entries


_JSON_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'
"""A JSON string; an unterminated one runs to the end."""
_JSON_STRINGS = re.compile(_JSON_STRING, re.DOTALL)
_JSON_CHUNK = re.compile(b'(?:[^"]+|' + _JSON_STRING + b"){1,4096}", re.DOTALL)
"""Up to 4096 runs of strings or of other bytes: substituting in one chunk at a time keeps
the list of pieces ``re.sub`` builds small."""


def json_counts(data: Bytes) -> tuple[int, int, int, int, int, int]:
    """("[", "[]", "{", "{}", ":", ",") outside strings in JSON ``data``, whitespace
    ignored (an unterminated string runs to the end). Reference for the C accelerator's
    ``json_counts``."""
    counts = [0] * 6
    last, i, end = b"", 0, len(data)
    while i < end:
        chunk = _JSON_CHUNK.match(data, i)
        assert chunk is not None  # every byte starts a string or a run of other bytes
        bare = _JSON_STRINGS.sub(b'"', chunk.group()).translate(None, b" \t\n\r")
        for k, token in enumerate((b"[", b"[]", b"{", b"{}", b":", b",")):
            counts[k] += bare.count(token)
        split = last + bare[:1]  # an empty array or map split between two chunks
        counts[1], counts[3] = counts[1] + (split == b"[]"), counts[3] + (split == b"{}")
        last, i = bare[-1:] or last, chunk.end()
    return tuple(counts)  # type: ignore[return-value]


if frames.IMPLEMENTATION is frames.ACCELERATED:
    from ._frames import json_counts as scan_json
    from ._frames import msgpack_counts as scan_msgpack
else:
    scan_json, scan_msgpack = json_counts, msgpack_counts
"""The scans the codecs use: the C ones when the frame codec is C, else the references."""


def _too_complex(kind: str, size: int, cost: int, budget: int) -> PayloadTooComplex:
    return PayloadTooComplex(
        f"{kind} payload of {size} bytes would decode to {cost} bytes of arrays and maps "
        f"(the limit is {budget} per payload byte)"
    )


def _msgpack_unpackb(data: Bytes) -> Any:
    """msgpack.unpackb with every length bounded by the payload's size and, for big
    payloads, the arrays and maps counted first (see MSGPACK_BUDGET)."""
    size = len(data)
    if size >= COUNTED_FROM:
        cost = container_bytes(*scan_msgpack(data))
        if cost > MSGPACK_BUDGET * size:
            raise _too_complex("msgpack", size, cost, MSGPACK_BUDGET)
    try:
        # str as str (raw=False) is msgpack 1.0's default; maps may have any hashable keys
        return msgpack.unpackb(
            data,
            strict_map_key=False,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=size,
        )
    except msgpack.StackError:
        raise PayloadTooComplex(
            f"msgpack payload of {size} bytes is nested too deeply (limit 1024 levels)"
        ) from None


def _json_loads(data: Bytes) -> Any:
    """json.loads, for big payloads with the arrays and maps counted first (see JSON_BUDGET)."""
    size = len(data)
    if size >= COUNTED_FROM:
        arrays, empty_arrays, maps, empty_maps, colons, commas = scan_json(data)
        nonempty = maps - empty_maps
        # a map of n pairs has n - 1 commas; every other comma separates array elements
        elements = max(0, arrays - empty_arrays + commas - (colons - nonempty))
        cost = container_bytes(arrays, elements, maps, nonempty, colons)
        if cost > JSON_BUDGET * size:
            raise _too_complex("JSON", size, cost, JSON_BUDGET)
    return json.loads(data if type(data) is bytes else bytes(data))


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
            return _json_loads(data)
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
