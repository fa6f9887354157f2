"""Fixtures shared by every test folder."""

import os
import secrets

import pytest
import torch
from support.e2e import lmcache_env  # noqa: F401  (a fixture)
from support.presets import preset  # noqa: F401  (a fixture: each test runs under both presets)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: without one they are skipped, saying so. The GPU
    runner (benchmarks/run_gpu_checks.sh) selects them with ``-m gpu``."""
    if torch.cuda.is_available():
        return
    reason = "marked gpu: needs a CUDA device and none is visible (run `pytest -m gpu` on a GPU machine)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_outside_lmcache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without the caller's LMCACHE_* variables: an exported config or
    LMCACHE_CONFIG_FILE would change what the engine, the server and their subprocesses load."""
    for key in [k for k in os.environ if k.startswith("LMCACHE_") and k != "LMCACHE_SERVER_SECRET"]:
        monkeypatch.delenv(key)


# Every server and client of the test session (subprocesses inherit it) shares one server secret, so
# no test writes ~/.lmcache/server_secret; tests of the secret file clear it.
os.environ.setdefault("LMCACHE_SERVER_SECRET", secrets.token_hex(32))
