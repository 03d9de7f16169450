# The cffi extension is declared here because setuptools has no pyproject
# key for cffi_modules; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["pktipc/_build_ffi.py:ffibuilder"])
