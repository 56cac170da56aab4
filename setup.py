"""Builds the C parts: the KCP core (cffi API mode) and the optional accelerators, one per layer.

All other metadata lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    cffi_modules=["polyrpc/transports/kcp/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "polyrpc.wire._frames",
            ["polyrpc/wire/_frames.c"],
            depends=["polyrpc/wire/_frames.h"],
            optional=True,
        ),
        Extension(
            "polyrpc.session._routing",
            ["polyrpc/session/_routing.c", "polyrpc/session/_state.c"],
            depends=[
                "polyrpc/wire/_frames.h",
                "polyrpc/session/_routing.h",
                "polyrpc/session/_state.h",
            ],
            optional=True,
        ),
        Extension(
            "polyrpc.rpc._callserver",
            ["polyrpc/rpc/_callserver.c"],
            depends=[
                "polyrpc/wire/_frames.h",
                "polyrpc/session/_routing.h",
                "polyrpc/session/_state.h",
            ],
            optional=True,
        ),
    ],
)
