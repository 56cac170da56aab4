"""Remote calls over the message API: dispatch, services, proxies, streaming, and the
Client/Server endpoints."""
