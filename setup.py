"""The optional C extension lmcache._hashchain; everything else is in pyproject.toml.

``optional=True``: without a compiler the install still succeeds and lmcache.keys hashes in pure
Python (same results, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("lmcache._hashchain", ["lmcache/_hashchain.c"], optional=True, extra_compile_args=["-O2"])
    ]
)
