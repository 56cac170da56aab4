"""The session layer's C accelerator (polyrpc.session._routing), imported once for the
modules that use its types: routing.py its decoder, state.py its session state."""

from __future__ import annotations

ROUTING_DECODER: type | None = None
"""The C ``RoutingDecoder`` when the extension is built."""
SESSION_STATE: type | None = None
"""The C ``SessionState`` when the extension is built."""

try:
    from ._routing import RoutingDecoder, SessionState
except ImportError:
    pass
else:
    ROUTING_DECODER, SESSION_STATE = RoutingDecoder, SessionState
