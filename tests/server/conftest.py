"""Fixtures for the cache server tests: real server subprocesses on free ports and private ipc paths."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from in_process_server import start_serving, stop_serving
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


@pytest.fixture
def serve() -> Iterator[Callable[[str], CacheServer]]:
    """Start in-process servers whose ``--pool-sharing`` is the argument; stopped after the test."""
    started: list[tuple[CacheServer, threading.Thread]] = []

    def start(policy: str) -> CacheServer:
        started.append(start_serving(policy))
        return started[-1][0]

    yield start
    for server, thread in started:
        stop_serving(server, thread)


@pytest.fixture
def mapped(monkeypatch) -> list[int]:
    """The ids of the slabs mapped from now on, by any client of this process (by name in /dev/shm or
    by descriptor)."""
    ids: list[int] = []
    from lmcache.server import slab_mappings

    real_by_name, real_by_descriptor = slab_mappings.map_slab, slab_mappings.map_descriptor

    def by_name(info, **kw):  # type: ignore[no-untyped-def]
        ids.append(info.id)
        return real_by_name(info, **kw)

    def by_descriptor(info, fd, **kw):  # type: ignore[no-untyped-def]
        ids.append(info.id)
        return real_by_descriptor(info, fd, **kw)

    monkeypatch.setattr(slab_mappings, "map_slab", by_name)
    monkeypatch.setattr(slab_mappings, "map_descriptor", by_descriptor)
    return ids


@pytest.fixture
def make_server() -> Iterator:
    """In-process servers (a thread each) with a private engine; stopped at the end."""
    started: list[tuple[CacheServer, threading.Thread]] = []

    def make(l1_gb: float = 0.05, **config: object) -> CacheServer:
        engine = CacheEngine(
            LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=l1_gb), pinned=False
        )
        server = CacheServer(engine, ServerConfig(**{"port": 0, "ipc_path": None, **config}))  # type: ignore[arg-type]
        server.start()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield make
    for server, thread in started:
        server.stop()
        thread.join(30)
