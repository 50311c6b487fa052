"""setuptools shim: only here to name the cffi build script (metadata lives in pyproject.toml)."""

from setuptools import setup

setup(cffi_modules=["csrc/ffi_build.py:ffibuilder"])
