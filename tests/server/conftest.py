"""Fixtures for the cache server tests: real server subprocesses on free ports and private ipc paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server_process import ServerProcess

from lmcache.server.client import CacheServerClient


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short, under /tmp.
    path = Path(tempfile.mkdtemp(prefix="lmcs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(workdir: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(*extra: str, port: int | None = None, wait: bool = True, ipc: bool = True) -> ServerProcess:
        server = ServerProcess(workdir, port, *extra, ipc=ipc)
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
