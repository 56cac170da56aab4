"""Build the optional C accelerator of the frame codec (metadata lives in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("polyrpc.core._frames", ["polyrpc/core/_frames.c"], optional=True)])
