"""The two presets as a test fixture: in-process, or through a cache server started for the test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcache.config import load_engine_config
from lmcache.integration.tensorrt_llm.server_backend import process_connection
from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections

from .server_process import ServerProcess


@dataclass
class Preset:
    name: str
    server_url: str | None = None
    pool_sharing: str | None = None
    """``lmcache-mp``: how the workers share their pools (``LMCACHE_POOL_SHARING``; the server is in auto)."""

    def pinned(self) -> int:
        """Lookups still holding pins in the cache (engine or server)."""
        if self.server_url is None:
            return len(process_engine().engine.pinned_ids())
        client = process_connection(self.server_url, load_engine_config()).client
        return client.stats().pinned_lookups


@pytest.fixture(params=["lmcache", "lmcache-mp-export", "lmcache-mp-shared-l1"])
def preset(request: pytest.FixtureRequest, lmcache_env: pytest.MonkeyPatch) -> Iterator[Preset]:
    """In-process; or through a cache server (in ``auto``), the workers' pools exported (CPU shared
    memory, the server copies) or in the shared-L1 mode (the workers copy)."""
    if request.param == "lmcache":
        yield Preset("lmcache")
        return
    sharing = request.param.removeprefix("lmcache-mp-")
    workdir = Path(tempfile.mkdtemp(prefix="lmv2-", dir="/tmp"))
    # The default client timeout: no test here needs reaping, and a short one could reap a live client
    # whose heartbeats were held up on a busy machine.
    server = ServerProcess(workdir, None, "--chunk-size", "64").start()
    lmcache_env.setenv("LMCACHE_POOL_SHARING", sharing)  # after the server started: it stays in auto
    reset_process_connections()
    yield Preset("lmcache-mp", server.ipc_url, sharing)
    reset_process_connections()
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)
