"""Fixtures for the connector end-to-end tests."""

from support.e2e import lmcache_env  # noqa: F401
