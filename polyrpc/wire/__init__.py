"""The wire format: frames (header, metadata, payload), the incremental decoder, limits and
codecs. Pure: no asyncio, no streams; imports only polyrpc.errors."""
