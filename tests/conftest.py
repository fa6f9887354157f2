"""Fixtures shared by every test folder."""

import os

import pytest
from support.e2e import lmcache_env  # noqa: F401  (a fixture)
from support.presets import preset  # noqa: F401  (a fixture: each test runs under both presets)


@pytest.fixture(autouse=True)
def _no_outside_lmcache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without the caller's LMCACHE_* variables: an exported config or
    LMCACHE_CONFIG_FILE would change what the engine, the server and their subprocesses load."""
    for key in [k for k in os.environ if k.startswith("LMCACHE_")]:
        monkeypatch.delenv(key)
