"""Storage hygiene (docs/security.md): private disk files, a scan that touches only our files, and
stored values whose payload does not match their layout are misses that get deleted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from tier_helpers import make_engine, make_pool, space_of, store_all, tokens

from lmcache.keys import ChunkKey
from lmcache.storage import chunk_format
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.disk_store import MARKER, TIER_DIR, DiskStore
from lmcache.storage.remote_store import RemoteStore
from lmcache.transfer import BlockTransfer

NS = Namespace("m", b"float32/L2/KV2/E128/T8")  # 2048-byte rows of 8 tokens
ROWS_32 = 4 * 2048


def _key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32, 1, 0)


def _payload(nbytes: int) -> memoryview:
    return memoryview(np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes())


def test_disk_files_are_private_in_a_marked_subdirectory(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    assert store.write(NS, _key(1), 32, _payload(ROWS_32)) is not None
    root = tmp_path / TIER_DIR
    assert (root / MARKER).is_file()
    path = store.path_for(NS, _key(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (root, path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_scan_of_a_shared_directory_leaves_other_files_alone(tmp_path: Path) -> None:
    others = [tmp_path / "notes.tmp", tmp_path / "model.kv", tmp_path / "sub" / "x.kv"]
    others[2].parent.mkdir()
    for path in others:
        path.write_bytes(b"someone else's")
    DiskStore(tmp_path, 1 << 20).write(NS, _key(2), 32, _payload(ROWS_32))
    root = tmp_path / TIER_DIR
    stranger = root / "readme.kv"  # not in our format, even inside our directory
    stranger.write_bytes(b"not a chunk")
    torn = root / f"{_key(3).hex()}.kv.999999999.1.tmp"  # ours, its writer long gone
    torn.write_bytes(b"LMKV")
    again = DiskStore(tmp_path, 1 << 20)
    assert len(again) == 1
    assert all(path.read_bytes() == b"someone else's" for path in others)
    assert stranger.exists() and not torn.exists()


def test_a_tier_directory_of_another_user_or_unmarked_is_not_used(tmp_path: Path) -> None:
    (tmp_path / TIER_DIR).mkdir()
    foreign = tmp_path / TIER_DIR / "data"
    foreign.write_bytes(b"x")
    store = DiskStore(tmp_path, 1 << 20)  # exists, not empty, no marker: not ours
    assert len(store) == 0 and foreign.exists() and not (tmp_path / TIER_DIR / MARKER).exists()
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    other = tmp_path / "other"
    (other / TIER_DIR).mkdir(parents=True)
    os.chown(other / TIER_DIR, 65534, 65534)
    assert DiskStore(other, 1 << 20).last_scan.files == 0
    assert not (other / TIER_DIR / MARKER).exists()


def test_disk_value_whose_payload_does_not_match_its_layout_is_a_deleted_miss(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    short = ROWS_32 - 64  # a valid header and checksum, for the wrong number of bytes
    store.write(NS, _key(4), 32, _payload(short))
    path = store.path_for(NS, _key(4))
    entry = store.lookup(NS, _key(4))
    assert entry is not None
    assert not store.read_into(NS, _key(4), entry, memoryview(bytearray(short)))
    assert not path.exists() and store.lookup(NS, _key(4)) is None
    store.write(NS, _key(5), 32, _payload(short))
    assert len(DiskStore(tmp_path, 1 << 20)) == 0  # removed by the start-up scan too
    assert not store.path_for(NS, _key(5)).exists()


def test_redis_value_with_a_short_payload_is_a_deleted_miss_not_an_error(redis_server) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(128)
    a = make_engine(None, redis_server.url)
    toks = tokens(256)
    store_all(a, pool, toks)
    spans = a.chunk_spans(space_of(pool), 0, toks, None)
    ns = a.namespace(space_of(pool))
    a.close()
    r = redis.Redis.from_url(redis_server.url)
    name = RemoteStore.key_name(ns, spans[2].key)
    header, payload = chunk_format.decode(r.get(name))
    r.set(name, chunk_format.encode(spans[2].key, ns, header.num_tokens, bytes(payload)[:-64]))
    for _ in range(2):  # the second lookup too: never an internal error, never kept
        b = make_engine(None, redis_server.url)
        assert b.lookup(space_of(pool), toks) == 128
        dst = make_pool(128)
        hit = b.lookup(space_of(pool), toks, pin_id="p")
        blocks = list(range(hit // 16))
        assert (
            b.retrieve(space_of(pool), 0, dst, BlockTransfer(toks, None, blocks, 0, hit), pin_id="p") == hit
        )
        b.close()
    assert r.exists(name) == 0


def test_a_tier_chunk_shorter_than_its_key_names_is_a_miss_never_a_load_past_its_slot(tmp_path: Path) -> None:
    """A disk file under a full chunk's key whose header, layout and checksum agree on one row: were
    it promoted, a load of the chunk's rows would read the next L1 slot (another chunk's bytes)."""
    from tier_helpers import CHUNK, TPB, disk_files_of

    pool = make_pool(64)
    space = space_of(pool)
    prompt, other = tokens(CHUNK), tokens(CHUNK, offset=10_000)
    writer = make_engine(tmp_path)
    ns = writer.namespace(space)
    row = space.layout.row_bytes
    for toks, fill in ((prompt, 0x11), (other, 0x77)):
        [span] = writer.chunk_spans(space, 0, toks, None)
        disk_files_of(writer).write(ns, span.key, TPB, memoryview(np.full(row, fill, dtype=np.uint8)))
    writer.close()

    reader = make_engine(tmp_path)
    try:
        assert reader.lookup(space, other) == 0 and reader.lookup(space, prompt, pin_id="p") == 0
        dst = pool.clone()
        assert reader.retrieve(space, 0, dst, BlockTransfer(prompt, None, [0, 1, 2, 3], 0, CHUNK)) == 0
        assert torch.equal(dst, pool)  # nothing written
        assert reader.snapshot().l1.chunks == 0
    finally:
        reader.close()


def test_a_tier_chunk_longer_than_its_key_names_evicts_nothing(tmp_path: Path) -> None:
    from tier_helpers import CHUNK, TPB, disk_files_of

    pool = make_pool(64)
    space = space_of(pool)
    writer = make_engine(tmp_path, cpu_chunks=16)
    prompt = tokens(CHUNK, offset=50_000)
    [span] = writer.chunk_spans(space, 0, prompt, None)
    rows = 20 * CHUNK // TPB  # twenty chunks' rows: more than the whole 16-chunk L1
    big = np.zeros(rows * space.layout.row_bytes, dtype=np.uint8)
    assert disk_files_of(writer).write(writer.namespace(space), span.key, rows * TPB, memoryview(big))
    writer.close()

    reader = make_engine(tmp_path, cpu_chunks=16)
    try:
        resident = tokens(8 * CHUNK)
        assert store_all(reader, pool, resident) == 8 * CHUNK
        assert reader.lookup(space, prompt) == 0
        l1 = reader.snapshot().l1
        assert l1.evictions == 0 and l1.chunks == 8
        assert reader.lookup(space, resident) == 8 * CHUNK
    finally:
        reader.close()
