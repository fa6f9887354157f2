"""The shared-L1 mode at handler level, without sockets: a server engine in shared memory, its
:class:`SharedL1Service`, and a worker's :class:`SharedL1Copier` over a CPU pool."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.server import protocol as P
from lmcache.server.shared_l1 import InstanceScope, SharedL1Service
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.shm_slabs import ShmSlabSource

TPB = 16
CHUNK = 64
TOKENS = list(range(1000, 1000 + 4 * CHUNK + 32))  # 4 full chunks and half a chunk


@dataclass
class SharedL1Env:
    engine: CacheEngine
    service: SharedL1Service
    copier: SharedL1Copier
    pool: torch.Tensor
    scope: InstanceScope

    def close(self) -> None:
        self.engine.l1.arena.close()


def shared_l1_env(tmp_path: Path, **service_options: int) -> SharedL1Env:
    """Instance 7 (rank 0) registered with a fresh service; ``service_options`` go to the service."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    engine = CacheEngine(config, pinned=False, slab_source=ShmSlabSource(shm_dir=str(tmp_path)))
    pool = torch.randn(64, 2, 2, 2 * TPB * 8)
    space = KeySpace("model", PoolLayout.of_pool(pool, TPB))
    service = SharedL1Service(engine, **service_options)
    copier = SharedL1Copier(pool, shm_dir=str(tmp_path))
    return SharedL1Env(engine, service, copier, pool, InstanceScope(7, space, 0, registration=7))


def shuffled_blocks(n: int, seed: int, base: int = 0) -> list[int]:
    """``n`` of the blocks ``[base, base + 32)`` in a random order."""
    ids = list(range(base, base + 32))
    random.Random(seed).shuffle(ids)
    return ids[:n]


def copy_store(copier: SharedL1Copier, reply: P.StoreSlots, block_ids: list[int]) -> None:
    """What a worker does with one ``store_reserve`` reply (no lease): gather each reserved chunk's
    rows into its slot, complete on return."""
    copier.apply(reply)
    batch = copier.begin_store(block_ids)
    copier.add_chunks(batch, reply, block_ids)
    copier.finish_store(batch)
    copier.wait_stored()


def copy_load(copier: SharedL1Copier, reply: P.LoadSlots, block_ids: list[int]) -> int:
    """What a worker does with a ``load`` reply in one part: scatter its chunks, complete on return;
    the tokens loaded."""
    batch = copier.begin_load(block_ids)
    copier.add_load(batch, reply, block_ids)
    copier.finish_load(batch)
    return reply.loaded
