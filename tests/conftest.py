"""Fixtures shared by every test folder."""

from support.e2e import lmcache_env  # noqa: F401  (a fixture)
from support.presets import preset  # noqa: F401  (a fixture: each test runs under both presets)
