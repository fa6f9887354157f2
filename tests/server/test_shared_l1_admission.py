"""Who may register a shared-l1 pool: the server's own user and root only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.server_process import CHUNK, MODEL, TPB

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.failures import ServiceFailure
from lmcache.server.security import Peer
from lmcache.server.server import ServerConfig
from lmcache.server.service import CacheService
from lmcache.server.shared_l1 import SharedL1Service
from lmcache.server.shared_l1_handlers import SharedL1Handlers
from lmcache.shm_slabs import ShmSlabSource


def test_only_the_servers_own_user_may_register_a_shared_l1_pool(tmp_path: Path) -> None:
    """The server publishes the slots a shared-l1 worker reports copied on its word, and a slot keeps the
    bytes of the chunk evicted from it: another uid admitted by --allow-uid could publish other tenants'
    KV under its own keys and read it back through an exported pool."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    engine = CacheEngine(config, pinned=False, slab_source=ShmSlabSource(shm_dir=str(tmp_path)))
    service = CacheService(engine, ServerConfig(port=0, ipc_path=None, client_timeout_s=0))
    SharedL1Handlers.install(service, SharedL1Service(engine))

    def register(peer: Peer, instance_id: int) -> object:
        pool = P.SharedL1Pool(shape=[64, 2, 2, TPB * 8], dtype="float32", pid=os.getpid())
        req = P.Register(
            instance_id=instance_id, rank=0, world_size=1, model_name=MODEL, tokens_per_block=TPB, pool=pool
        )
        return service.handle(req, Call(peer))

    try:
        other = Peer(os.geteuid() + 4242, os.getegid(), os.getpid())
        with pytest.raises(ServiceFailure, match="LMCACHE_POOL_SHARING=export") as refused:
            register(other, 1)
        assert refused.value.code == P.ErrorCode.UNAUTHORIZED
        assert isinstance(register(Peer(os.geteuid(), os.getegid(), os.getpid()), 2), P.RegisterInfo)
    finally:
        service.close()
        engine.l1.arena.close()
