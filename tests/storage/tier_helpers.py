"""Shared helpers of the tier tests: a small pool layout, engines with disk/remote tiers, checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.transfer import BlockTransfer

TPB = 16
CHUNK = 64  # 4 blocks per chunk
ROW_SHAPE = (2, 2, 2 * TPB * 8)  # 4 KiB rows of float32: a chunk is 16 KiB
CHUNK_BYTES = 4 * 2 * 2 * 2 * TPB * 8 * 4
MODEL = "tier-model"


def run_tier_proc(command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``tier_proc.py command args`` in a fresh interpreter; the JSON of its last output line.
    A failed run fails the calling test with the child's stderr."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(here / "tier_proc.py"), command, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def make_pool(num_blocks: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, *ROW_SHAPE, generator=gen)


def space_of(pool: torch.Tensor, world_size: int = 1) -> KeySpace:
    return KeySpace(MODEL, PoolLayout.of_pool(pool, TPB), world_size)


def tokens(n: int, offset: int = 0) -> list[int]:
    return [offset + i for i in range(n)]


def config(
    disk: Any = None,
    remote_url: str | None = None,
    *,
    cpu_chunks: int = 64,
    disk_chunks: int = 256,
    **kw: Any,
) -> LMCacheEngineConfig:
    values: dict[str, Any] = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": cpu_chunks * CHUNK_BYTES / 2**30,
        "local_disk": None if disk is None else str(disk),
        "max_local_disk_size": disk_chunks * (CHUNK_BYTES + 256) / 2**30 if disk is not None else 0.0,
        "remote_url": remote_url,
        "blocking_timeout_secs": 5.0,
        "lookup_timeout_ms": 1000,
        "tier_retry_initial_s": 0.05,
        "tier_retry_max_s": 0.2,
    }
    return LMCacheEngineConfig.from_defaults(**{**values, **kw})


def disk_files_of(engine: CacheEngine) -> DiskStore:
    """The engine's disk tier's file store."""
    assert engine.tiers is not None
    return next(t.store for t in engine.tiers.tiers if isinstance(t, DiskTier))


def dropped_writes(engine: CacheEngine) -> int:
    """Write-behinds dropped, over every lower tier."""
    return sum(t.dropped_writes for t in engine.snapshot().tiers)


def wait_scanned(engine: CacheEngine) -> CacheEngine:
    """``engine`` once its disk tier (if any) has indexed every file it found at start-up."""
    for tier in engine.tiers.tiers if engine.tiers is not None else ():
        if isinstance(tier, DiskTier):
            assert tier.wait_scanned(60), "the disk tier's start-up scan did not end"
    return engine


def make_engine(
    disk: Any = None, remote_url: str | None = None, *, scanned: bool = True, **kw: Any
) -> CacheEngine:
    """An engine on ``disk`` / ``remote_url``; with ``scanned``, once its disk index is complete
    (the start-up scan runs in the background)."""
    engine = CacheEngine(config(disk, remote_url, **kw), pinned=False)
    return wait_scanned(engine) if scanned else engine


def store_all(engine: CacheEngine, pool: torch.Tensor, toks: list[int], first_block: int = 0) -> int:
    n = len(toks) // TPB
    return engine.store(
        space_of(pool),
        0,
        pool,
        BlockTransfer(toks, None, list(range(first_block, first_block + n)), 0, len(toks)),
    )


def load_all(
    engine: CacheEngine, pool: torch.Tensor, toks: list[int], dst: list[int], pin: object = None
) -> int:
    """Lookup (pinned) then retrieve into ``dst`` blocks; returns tokens loaded."""
    space = space_of(pool)
    hit = engine.lookup(space, toks, pin_id=pin)
    if hit == 0:
        if pin is not None:
            engine.release(pin)
        return 0
    return engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, hit), pin_id=pin)
