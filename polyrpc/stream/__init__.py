"""The stream trait every transport implements, the Transport interface, addresses and the
registry that loads transports by scheme. Imports only polyrpc.errors."""
