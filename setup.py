"""Builds the C parts: the KCP core (cffi API mode) and the optional frame-codec accelerator.

All other metadata lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    cffi_modules=["polyrpc/transports/kcp/_build.py:ffibuilder"],
    ext_modules=[
        Extension("polyrpc.wire._frames", ["polyrpc/wire/_frames.c"], optional=True),
    ],
)
