"""The optional C extensions (lmcache._hashchain, _busguard, _dmabatch, _claims); everything else is in
pyproject.toml.

``optional=True``: without a compiler the install still succeeds; lmcache.keys then hashes in pure
Python (same results, slower), and the cache server checks a shared pool's size before each copy but
cannot survive a client shrinking it during one (see docs/security.md)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # -O3: the compiler vectorizes _blake3.c's AVX-512 lane arrays only at this level.
        Extension(
            "lmcache._hashchain",
            ["lmcache/_hashchain.c", "lmcache/_blake3.c"],
            depends=["lmcache/_blake3.h", "lmcache/_blake3_lanes.h"],
            optional=True,
            extra_compile_args=["-O3"],
        ),
        Extension("lmcache._busguard", ["lmcache/_busguard.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("lmcache._dmabatch", ["lmcache/_dmabatch.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("lmcache._claims", ["lmcache/_claims.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
