"""A cache server serving on a thread of the test process (its L1 passed to workers by descriptor, the
default)."""

from __future__ import annotations

import threading

from support.server_process import CHUNK

from lmcache.config import LMCacheEngineConfig
from lmcache.server.client import CacheServerClient
from lmcache.server.server import CacheServer, ServerConfig, server_engine


def start_serving(
    policy: str, ipc_path: str | None = None, client_timeout_s: float = 0
) -> tuple[CacheServer, threading.Thread]:
    """An in-process server whose ``--pool-sharing`` is ``policy``, serving on its own thread (its
    reaper off unless ``client_timeout_s``; :meth:`CacheServer.reap` reaps on demand)."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    engine = server_engine(config, policy, pinned=False)
    server_config = ServerConfig(
        port=0, ipc_path=ipc_path, client_timeout_s=client_timeout_s, pool_sharing=policy
    )
    server = CacheServer(engine, server_config)
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop_serving(server: CacheServer, thread: threading.Thread) -> None:
    server.stop()
    thread.join(30)
    assert not thread.is_alive()


def client_of(server: CacheServer) -> CacheServerClient:
    """A client of ``server`` over TCP."""
    return CacheServerClient(f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0)
