"""Builds the KCP C core (cffi API mode); all other metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["polyrpc/transports/kcp/_build.py:ffibuilder"])
