"""One multiplexed, full-duplex connection over a stream: its sans-IO protocol (core.py:
sequence ids, pending calls, deadlines, heartbeats, the handshake) and the asyncio adapter
that runs it (session.py)."""
