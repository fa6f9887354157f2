"""Fixtures shared by every test folder."""

from support.e2e import lmcache_env  # noqa: F401  (a fixture)
