"""Built-in transports; each lives in its own sub-package and only touches the registry."""
