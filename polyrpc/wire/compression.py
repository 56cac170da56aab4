"""Payload compression, negotiated per connection in HELLO (see docs/protocol.md).

A compressed frame carries :data:`~polyrpc.wire.frames.FLAG_COMPRESSED` and a zstd frame as
its payload. The zstd frame must declare its decompressed size: the receiver refuses the
payload before decompressing anything when that size is missing or over its limit, and
never lets the output grow past the declared size (a payload that lies about it is refused).

zstandard is an optional dependency (``pip install 'polyrpc[zstd]'``); it is imported only
when compression is used.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import ProtocolError

ZSTD = "zstd"
ZSTD_LEVEL = 1
"""Level 1: on JSON-like payloads it compressed smaller than level 3 and lz4, and faster
than level 3 (docs/bench/compression.md)."""
INSTALL_HINT = "pip install 'polyrpc[zstd]' (or pip install zstandard)"


class DecompressionRefused(ProtocolError):
    """A compressed payload was refused before or while decompressing it; only that message
    is lost. ``code``: ``decompressed_too_large`` (it declares a size over the limit) or
    ``bad_compressed_payload`` (no declared size, not valid zstd, or not the size declared)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Zstd:
    """zstd compression of payloads, the content size always written into the frame."""

    name = ZSTD

    def __init__(self) -> None:
        try:
            import zstandard
        except ImportError:
            raise ImportError(
                f"compression={ZSTD!r} needs the zstandard package: {INSTALL_HINT}"
            ) from None
        self._zstd: Any = zstandard
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(self, payload: bytes | bytearray | memoryview) -> bytes | None:
        """The payload compressed, or None when compressing does not make it smaller."""
        packed: bytes = self._compressor.compress(payload)
        return packed if len(packed) < len(payload) else None

    def decompress(self, packed: bytes, limit: int) -> bytes:
        """The payload ``packed`` holds, at most ``limit`` bytes; DecompressionRefused when
        it declares no size, declares more than ``limit``, or does not produce exactly the
        size it declares (the output never grows past that size)."""
        try:
            declared = self._zstd.frame_content_size(packed)
        except self._zstd.ZstdError as exc:
            raise DecompressionRefused(
                f"compressed payload is not a zstd frame ({exc})", "bad_compressed_payload"
            ) from None
        if declared < 0:
            raise DecompressionRefused(
                "compressed payload does not declare its decompressed size (required)",
                "bad_compressed_payload",
            )
        if declared > limit:
            raise DecompressionRefused(
                f"compressed payload declares {declared} bytes decompressed, over the limit "
                f"of {limit} bytes (max_frame)",
                "decompressed_too_large",
            )
        try:
            # with a declared size zstd writes into a buffer of exactly that size and fails
            # rather than write past it (max_output_size applies only to undeclared sizes)
            payload: bytes = self._decompressor.decompress(packed, max_output_size=limit)
        except self._zstd.ZstdError as exc:
            raise DecompressionRefused(
                f"compressed payload does not decompress to its declared {declared} bytes ({exc})",
                "bad_compressed_payload",
            ) from None
        if len(payload) != declared:
            raise DecompressionRefused(
                f"compressed payload decompressed to {len(payload)} bytes, not the {declared} "
                "it declares",
                "bad_compressed_payload",
            )
        return payload


COMPRESSIONS: dict[str, type[Zstd]] = {ZSTD: Zstd}
"""Every compression this implementation can offer, by the name used in HELLO."""
_per_thread = threading.local()
"""Each thread's compression objects, shared by the connections its event loop runs."""


def compression_by_name(name: str) -> Zstd:
    """The compression called ``name``, one object per thread shared by its connections
    (zstd's contexts hold about 200 KiB once used; a thread compresses one payload at a
    time): ValueError for an unknown name, ImportError (naming the pip command) when its
    library is not installed."""
    kind = COMPRESSIONS.get(name)
    if kind is None:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(COMPRESSIONS)}")
    shared: Zstd | None = getattr(_per_thread, name, None)
    if shared is None:
        shared = kind()
        setattr(_per_thread, name, shared)
    return shared


def available(name: str) -> bool:
    """True if compression ``name`` is known and its library is installed."""
    try:
        compression_by_name(name)
    except (ValueError, ImportError):
        return False
    return True
