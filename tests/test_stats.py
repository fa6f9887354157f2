"""The one stats snapshot: what the engine hands out, its wire form and its summary lines."""

from __future__ import annotations

import msgspec
import pytest
import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.stats import decode_snapshot, encode_snapshot, summary_lines
from lmcache.transfer import BlockTransfer

TPB = 16


def _engine_with_traffic(tmp_path) -> CacheEngine:  # type: ignore[no-untyped-def]
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=64, max_local_cpu_size=0.01, local_disk=str(tmp_path), max_local_disk_size=0.01
    )
    engine = CacheEngine(config, pinned=False)
    assert engine.tiers is not None and engine.tiers.tiers[0].wait_scanned(60)  # the disk index is complete
    pool = torch.randn(16, 2, 2, TPB * 8)
    space = KeySpace("m", PoolLayout.of_pool(pool, TPB))
    toks = list(range(128))
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 0, 128)) == 128
    assert engine.lookup(space, toks, pin_id="r") == 128
    return engine


def test_snapshot_has_counters_l1_tiers_and_latency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = _engine_with_traffic(tmp_path)
    try:
        assert engine.tiers is not None and engine.tiers.flush(5.0)
        snap = engine.snapshot()
        assert snap.counters.stored_chunks == 2 and snap.counters.hit_tokens == 128
        assert snap.counters.hit_rate == 1.0 and snap.pinned_lookups == 1
        assert snap.l1.chunks == 2 and snap.l1.pinned_chunks == 2 and snap.l1.eviction_policy == "LRU"
        disk = snap.tier("disk")
        assert disk.healthy and disk.reason is None and disk.writes == 2 and disk.chunks == 2
        assert disk.capacity_bytes == config_bytes(engine)
        assert snap.latency.store.count == 1 and snap.latency.lookup.count == 1 and snap.healthy
        with pytest.raises(KeyError, match="no 'remote' tier; configured: \\['disk'\\]"):
            snap.tier("remote")
    finally:
        engine.close()
    closed = engine.snapshot().tier("disk")
    assert not closed.healthy and closed.reason == "closed"


def config_bytes(engine: CacheEngine) -> int:
    return engine.config.max_local_disk_bytes


def test_snapshot_round_trips_the_wire_and_rejects_garbage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = _engine_with_traffic(tmp_path)
    try:
        snap = engine.snapshot()
    finally:
        engine.close()
    assert decode_snapshot(encode_snapshot(snap)) == snap
    with pytest.raises(msgspec.ValidationError):
        decode_snapshot(msgspec.msgpack.encode({"chunk_size": "big"}))
    lines = summary_lines(snap)
    assert lines[1].startswith("lookups 1: 128 of 128 tokens hit (100.0%); 1 pinned")
    assert lines[-1].startswith(f"disk {snap.tier('disk').where}: up; 0 hits")
