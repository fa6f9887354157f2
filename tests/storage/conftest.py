"""Fixtures of the tier tests: real Redis servers (one, and a three-master cluster) on free ports.

A missing ``redis-server`` FAILS these tests (with the apt-get hint) rather than skipping them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_servers import RedisCluster, RedisServer, redis_binaries


def _require_redis() -> None:
    try:
        redis_binaries()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short, under /tmp.
    path = Path(tempfile.mkdtemp(prefix="lmct-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def _redis_session(redis_workdir: Path) -> Iterator[RedisServer]:
    _require_redis()
    sock = redis_workdir / "redis.sock"
    server = RedisServer(redis_workdir / "single", "--unixsocket", str(sock), "--unixsocketperm", "700")
    server.unix_socket = sock  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> RedisServer:
    """The session's Redis server, emptied for each test."""
    _redis_session.cli("flushall")
    return _redis_session


@pytest.fixture(scope="session")
def _cluster_session(redis_workdir: Path) -> Iterator[RedisCluster]:
    _require_redis()
    cluster = RedisCluster(redis_workdir / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(_cluster_session: RedisCluster) -> RedisCluster:
    for node in _cluster_session.nodes:
        node.cli("flushall")
    return _cluster_session


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Factory for a private server (given extra redis-server arguments) a test may kill and restart."""
    _require_redis()
    started: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="lmcr-", dir="/tmp")), *extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
