"""Fixtures for the cache server tests: real server subprocesses on free ports and private ipc paths."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server_process import CHUNK, ServerProcess

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server.client import CacheServerClient
from lmcache.server.server import CacheServer, ServerConfig


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short, under /tmp.
    path = Path(tempfile.mkdtemp(prefix="lmcs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(workdir: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(
        *extra: str,
        port: int | None = None,
        wait: bool = True,
        ipc: bool = True,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        server = ServerProcess(workdir, port, *extra, ipc=ipc, env=env)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server shared by the tests of a module (a small frame cap to test the limit)."""
    path = Path(tempfile.mkdtemp(prefix="lmcs-", dir="/tmp"))
    proc = ServerProcess(path, None, "--max-frame-mb", "1", "--max-workers", "2").start()
    yield proc
    proc.stop()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[CacheServerClient]:
    c = CacheServerClient(server.ipc_url, timeout_s=20.0)
    yield c
    c.close()


@pytest.fixture
def inproc_server() -> Iterator[CacheServer]:
    """A server on a thread of the test process (no ipc socket), for tests that inspect its internals."""
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05), pinned=False
    )
    server = CacheServer(engine, ServerConfig(port=0, ipc_path=None, max_workers=4, client_timeout_s=0))
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(30)
    assert not thread.is_alive()
