"""The optional C extensions lmcache._hashchain and lmcache._busguard; everything else is in
pyproject.toml.

``optional=True``: without a compiler the install still succeeds; lmcache.keys then hashes in pure
Python (same results, slower), and the cache server checks a shared pool's size before each copy but
cannot survive a client shrinking it during one (see docs/security.md)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("lmcache._hashchain", ["lmcache/_hashchain.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("lmcache._busguard", ["lmcache/_busguard.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
