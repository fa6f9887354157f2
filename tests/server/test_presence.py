"""The server's presence counts (:mod:`lmcache.server.presence`): they follow L1 exactly (published
chunks counted, evicted, removed and cleared ones not, unpublished reservations never), clients map
them read-only from a 0600 region, and a lookup of a prompt the server holds nothing of is answered
without a round trip; a server with lower tiers offers none."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.server_process import ServerProcess

from lmcache.keys import ChunkKey
from lmcache.memory import HostArena, SlabSource
from lmcache.server.client import CacheServerClient
from lmcache.server.presence import RECENT_PUBLICATIONS, PresenceCounts, PresenceView, bucket
from lmcache.shm_slabs import ShmSlabInfo, ShmSlabSource, open_region
from lmcache.storage.cpu_store import CpuStore

BUCKETS = 1 << 10


def key(n: int, rank: int = 0) -> ChunkKey:
    return ChunkKey(n.to_bytes(8, "little") + bytes(24), 1, rank)


@pytest.fixture
def counts(tmp_path: Path) -> PresenceCounts:
    return PresenceCounts(ShmSlabSource(shm_dir=str(tmp_path)), buckets=BUCKETS)


def store_of(counts: PresenceCounts, chunks: int) -> CpuStore:
    """An L1 of ``chunks`` 64-byte slots observed by ``counts``."""
    store = CpuStore(HostArena(64 * chunks, source=SlabSource(False)), "LRU")
    store.observe(counts)
    return store


def put(store: CpuStore, k: ChunkKey) -> None:
    assert store.reserve(k, 64, 16) is not None
    store.commit(k)


def test_counts_follow_what_lookups_can_see(counts: PresenceCounts) -> None:
    store = store_of(counts, 2)
    reserved = key(1)
    assert store.reserve(reserved, 64, 16) is not None
    assert counts.count(reserved.chunk_hash) == 0  # reserved, not published: invisible
    store.abort(reserved)
    put(store, key(1))
    put(store, key(1, rank=1))  # the same chunk of another rank: one more in the same bucket
    assert counts.count(key(1).chunk_hash) == 2
    put(store, key(2))  # L1 holds two chunks: the least recently used goes
    assert counts.count(key(1).chunk_hash) == 1 and counts.count(key(2).chunk_hash) == 1
    assert store.remove(key(2))
    assert counts.count(key(2).chunk_hash) == 0
    store.clear()
    assert counts.count(key(1).chunk_hash) == 0


def test_publishing_a_chunk_already_held_counts_it_once(counts: PresenceCounts) -> None:
    store = store_of(counts, 4)
    put(store, key(3))
    assert store.reserve(key(99), 64, 16) is not None
    assert not store.publish_as(key(99), key(3), 16)  # already there: the reservation is dropped
    assert counts.count(key(3).chunk_hash) == 1
    assert store.reserve(key(98), 64, 16) is not None
    assert store.publish_as(key(98), key(4), 16)
    assert counts.count(key(4).chunk_hash) == 1


def test_an_observer_added_late_counts_what_is_already_there(counts: PresenceCounts) -> None:
    store = CpuStore(HostArena(64 * 4, source=SlabSource(False)), "LRU")
    put(store, key(5))
    store.observe(counts)
    assert counts.count(key(5).chunk_hash) == 1


def test_a_count_never_goes_below_zero(counts: PresenceCounts) -> None:
    k = key(6)
    counts.removed(k)
    counts.added(k)
    assert counts.count(k.chunk_hash) == 1
    collides = key(6 + BUCKETS)  # the same bucket
    assert bucket(collides.chunk_hash, BUCKETS) == bucket(k.chunk_hash, BUCKETS)
    counts.added(collides)
    counts.removed(k)
    assert counts.count(k.chunk_hash) == 1  # the other chunk of the bucket still answers "ask"


def test_a_view_holds_the_first_chunks_its_process_reported_until_newer_reports_push_them_out(
    counts: PresenceCounts, tmp_path: Path
) -> None:
    view = PresenceView.map(counts.info, shm_dir=str(tmp_path))
    assert view is not None and not view.may_hold(key(7).chunk_hash)
    view.published(key(7).chunk_hash)  # reported one-way: the server has not counted it yet
    assert view.may_hold(key(7).chunk_hash) and counts.count(key(7).chunk_hash) == 0
    assert not view.may_hold(key(7 + BUCKETS).chunk_hash)  # the same bucket, another chunk: still a miss
    for n in range(RECENT_PUBLICATIONS):
        view.published(key(1000 + n).chunk_hash)
    assert not view.may_hold(key(7).chunk_hash)  # bounded: the oldest report forgotten
    assert view.may_hold(key(1000).chunk_hash)


def test_clients_map_the_region_read_only_and_refuse_a_loose_one(
    counts: PresenceCounts, tmp_path: Path
) -> None:
    info = counts.info
    path = tmp_path / info.name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    view = PresenceView.map(info, shm_dir=str(tmp_path))
    assert view is not None and not view.may_hold(key(7).chunk_hash)
    counts.added(key(7))
    assert view.may_hold(key(7).chunk_hash)  # the server's update, seen through the mapping
    mapping = open_region(ShmSlabInfo(0, info.name, info.nbytes), writable=False, shm_dir=str(tmp_path))
    with pytest.raises(TypeError):
        mapping[0] = 1  # what clients map cannot be written
    os.chmod(path, 0o644)
    assert PresenceView.map(info, shm_dir=str(tmp_path)) is None  # others could write it: not used
    assert PresenceView.map(info, shm_dir=str(tmp_path / "elsewhere")) is None  # another host's
    counts.close()
    assert not path.exists()


def test_a_server_with_l1_alone_announces_its_counts_and_removes_them_at_exit(
    start_server: object, tmp_path: Path
) -> None:
    server: ServerProcess = start_server()  # type: ignore[operator]
    with CacheServerClient(server.ipc_url, timeout_s=20) as client:
        info = register_tiny(client)
    assert info.presence is not None
    region = Path("/dev/shm") / info.presence.name
    assert region.exists() and stat.S_IMODE(region.stat().st_mode) == 0o600
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait(timeout=30)
    assert not region.exists()


def test_a_server_with_a_disk_tier_announces_no_counts(start_server: object, tmp_path: Path) -> None:
    disk = {"LMCACHE_LOCAL_DISK": f"file://{tmp_path}/disk", "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"}
    server: ServerProcess = start_server(env=disk)  # type: ignore[operator]
    with CacheServerClient(server.ipc_url, timeout_s=20) as client:
        assert register_tiny(client).presence is None


def register_tiny(client: CacheServerClient):  # noqa: ANN201 - a RegisterInfo
    import torch

    from lmcache.testing import pool_modes

    pool = torch.zeros(8, 2, 2, 64)
    return pool_modes.register(client, pool, pool_modes.SHARED_L1, "test/presence", 16)
