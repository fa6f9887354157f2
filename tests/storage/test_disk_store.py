import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tier_helpers import (
    CHUNK_BYTES,
    disk_files_of,
    dropped_writes,
    load_all,
    make_engine,
    make_pool,
    run_tier_proc,
    space_of,
    store_all,
    tokens,
)

from lmcache.keys import ChunkKey
from lmcache.storage import disk_scan, disk_store
from lmcache.storage.chunk_format import Namespace, encode_header, parse_header, payload_checksum
from lmcache.storage.disk_store import TIER_DIR, DiskStore
from lmcache.transfer import BlockTransfer

NS = Namespace("m", b"sig")


def chunk_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kv"))


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "little"), 1, 0)


def payload(i: int, n: int = 1000) -> memoryview:
    return memoryview(np.full(n, i % 251, dtype=np.uint8))


def read(store: DiskStore, k: ChunkKey, n: int = 1000) -> bytes | None:
    entry = store.lookup(NS, k)
    if entry is None:
        return None
    out = np.zeros(n, dtype=np.uint8)
    return out.tobytes() if store.read_into(NS, k, entry, memoryview(out)) else None


def test_disk_store_writes_reads_evicts_and_rescans(tmp_path: Path) -> None:
    size = len(encode_header(key(0), NS, 7, payload(0))) + 1000
    store = DiskStore(tmp_path, capacity_bytes=3 * size + 10)
    for i in range(3):
        assert store.write(NS, key(i), 7, payload(i)) is not None
    assert store.lookup(NS, key(0)).size == size
    assert store.used_bytes == 3 * size <= store.capacity_bytes
    assert read(store, key(0)) == bytes(payload(0))  # key 0 becomes the most recently used
    assert store.write(NS, key(3), 7, payload(3)) is not None  # evicts key 1 (LRU)
    assert store.lookup(NS, key(1)) is None and len(chunk_files(tmp_path)) == 3
    checksum = store.write(NS, key(3), 7, payload(3))  # already there: nothing to do
    assert checksum == payload_checksum(payload(3))
    assert store.write(NS, key(9), 7, payload(9, 10_000)) is None  # larger than the whole cap
    again = DiskStore(tmp_path, capacity_bytes=3 * size + 10)
    assert {k for _, k in again.entries()} == {key(0), key(2), key(3)}
    assert again.used_bytes == store.used_bytes
    assert read(again, key(2)) == bytes(payload(2))
    assert again.lookup(NS, key(3)).num_tokens == 7
    smaller = DiskStore(tmp_path, capacity_bytes=size)  # cap lowered between runs: evicts at start-up
    assert len(smaller) == 1 and len(chunk_files(tmp_path)) == 1


def test_files_are_sharded_by_namespace_and_hash(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    store.write(NS, key(5), 1, payload(5))
    path = store.lookup(NS, key(5)).path
    assert path == tmp_path / TIER_DIR / NS.tag / key(5).chunk_hash.hex()[:2] / f"{key(5).hex()}.kv"
    assert path.exists() and not list(tmp_path.rglob("*.tmp"))


def test_engine_cache_survives_a_restart(tmp_path: Path) -> None:
    pool = make_pool(128)
    first = make_engine(tmp_path)
    a, b = tokens(320), tokens(192, 50_000)
    assert store_all(first, pool, a) == 320
    assert store_all(first, pool, b, first_block=20) == 192
    first.close()
    assert first.l1.pinned_keys() == []
    assert len(chunk_files(tmp_path)) == 8

    second = make_engine(tmp_path)
    assert len(second.l1) == 0 and second.snapshot().tier("disk").chunks == 8
    space = space_of(pool)
    assert second.lookup(space, a) == 320  # no pin: promoted into L1 anyway
    dst = list(range(64, 84))
    pool[dst] = 0
    assert load_all(second, pool, a, dst, pin="a") == 320
    assert torch.equal(pool[dst], pool[:20])
    dst_b = list(range(90, 102))
    assert load_all(second, pool, b, dst_b, pin="b") == 192
    assert torch.equal(pool[dst_b], pool[20:32])
    assert second.snapshot().tier("disk").hits == 8 and second.l1.pinned_keys() == []
    second.close()


def test_lookup_pins_promoted_chunks_and_retrieve_without_lookup_promotes(tmp_path: Path) -> None:
    pool = make_pool(128)
    with make_engine(tmp_path) as first:
        store_all(first, pool, tokens(256))
    second = make_engine(tmp_path)
    space = space_of(pool)
    assert second.lookup(space, tokens(256), pin_id="r") == 256
    assert len(second.l1.pinned_keys()) == 4
    second.release("r")
    second.clear()  # L1 empty again
    dst = list(range(64, 80))
    assert second.retrieve(space, 0, pool, BlockTransfer(tokens(256), None, dst, 0, 256)) == 256
    assert torch.equal(pool[dst], pool[:16])
    assert second.l1.pinned_keys() == []
    second.close()


def _damage(path: Path, offset: int | None = None, truncate: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    if truncate is not None:
        data = data[:truncate]
    if offset is not None:
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _files_by_position(engine_dir: Path, pool: torch.Tensor, toks: list[int]) -> list[Path]:
    probe = make_engine(None, cpu_chunks=8)
    spans = probe.chunk_spans(space_of(pool), 0, toks, None)
    store = DiskStore(engine_dir, 1 << 30, scan=False)
    ns = probe.namespace(space_of(pool))
    return [store.path_for(ns, s.key) for s in spans]


def test_truncated_or_flipped_header_is_removed_at_startup(tmp_path: Path) -> None:
    pool = make_pool(128)
    toks = tokens(256)
    with make_engine(tmp_path) as first:
        store_all(first, pool, toks)
    files = _files_by_position(tmp_path, pool, toks)
    header_len = parse_header(files[0].read_bytes()).header_len
    _damage(files[3], truncate=files[3].stat().st_size - 1)
    _damage(files[2], offset=10)  # a header byte
    second = make_engine(tmp_path)
    assert disk_files_of(second).last_scan.removed == 2
    assert not files[2].exists() and not files[3].exists()
    assert second.lookup(space_of(pool), toks) == 2 * 64
    dst = list(range(64, 72))
    assert load_all(second, pool, toks, dst, pin=1) == 128
    assert torch.equal(pool[dst], pool[:8])
    assert header_len % 64 == 0
    second.close()


def test_chunk_files_a_crash_emptied_or_zeroed_are_removed_at_startup(tmp_path: Path) -> None:
    """Without fsync a crash can leave a renamed chunk file empty or zero-filled: at our chunk path,
    it is ours, and removed; a file merely in our directory, not named as a chunk, stays."""
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    paths = []
    for i in (1, 2, 3):
        assert store.write(NS, key(i), 7, payload(i)) is not None
        paths.append(store.path_for(NS, key(i)))
    paths[0].write_bytes(b"")
    paths[1].write_bytes(bytes(paths[1].stat().st_size))
    look_alike = paths[2].parent / "notes.kv"
    look_alike.write_bytes(bytes(8))
    again = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert again.last_scan.removed == 2 and len(again) == 1
    assert not paths[0].exists() and not paths[1].exists()
    assert paths[2].exists() and look_alike.exists()
    assert again.used_bytes == paths[2].stat().st_size


def test_flipped_payload_byte_is_a_miss_and_removed_on_read(tmp_path: Path, caplog) -> None:
    pool = make_pool(128)
    toks = tokens(256)
    with make_engine(tmp_path) as first:
        store_all(first, pool, toks)
    files = _files_by_position(tmp_path, pool, toks)
    header_len = parse_header(files[1].read_bytes()).header_len
    _damage(files[1], offset=header_len + 1234)
    second = make_engine(tmp_path)
    assert second.snapshot().tier("disk").chunks == 4  # start-up checks headers only (by default)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert second.lookup(space_of(pool), toks, pin_id=1) == 64
    second.release(1)
    assert not files[1].exists() and second.snapshot().tier("disk").chunks == 3
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert second.l1.pinned_keys() == []
    second.close()
    # With disk_verify_on_startup the start-up scan reads every payload.
    _damage(files[2], offset=header_len + 5)
    third = make_engine(tmp_path, disk_verify_on_startup=True)
    assert disk_files_of(third).last_scan.removed == 1 and not files[2].exists()
    third.close()


def test_stale_temporary_files_are_removed_and_never_served(tmp_path: Path) -> None:
    pool = make_pool(128)
    toks = tokens(128)
    with make_engine(tmp_path) as first:
        store_all(first, pool, toks)
    files = _files_by_position(tmp_path, pool, toks)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    torn = files[1].with_name(f"{files[1].name}.{pid}.1{disk_store.TMP_SUFFIX}")
    torn.write_bytes(files[1].read_bytes()[:100])  # a crash mid-write leaves only the temporary file
    files[1].unlink()
    second = make_engine(tmp_path)
    assert not torn.exists()
    assert second.lookup(space_of(pool), toks) == 64
    second.close()


def test_disk_full_degrades_to_l1_with_one_warning_then_recovers(tmp_path: Path, monkeypatch, caplog) -> None:
    def full(src, dst):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_store.os, "replace", full)
    pool = make_pool(128)
    engine = make_engine(tmp_path)
    space = space_of(pool)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for i in range(4):
            toks = tokens(128, 10_000 * i)
            assert store_all(engine, pool, toks, first_block=8 * i) == 128
            assert engine.tiers.flush()
            assert engine.lookup(space, toks) == 128  # L1 keeps serving
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "No space left" in warnings[0].getMessage()
    assert engine.snapshot().tier("disk").writes == 0 and dropped_writes(engine) >= 1
    assert not chunk_files(tmp_path) and not list(tmp_path.rglob("*.tmp"))
    assert engine.l1.pinned_keys() == []
    monkeypatch.undo()
    deadline = time.monotonic() + 20
    i = 100
    while engine.snapshot().tier("disk").writes == 0 and time.monotonic() < deadline:
        store_all(engine, pool, tokens(64, 10_000 * i), first_block=40)
        engine.tiers.flush()
        i += 1
    assert engine.snapshot().tier("disk").writes >= 1 and chunk_files(tmp_path)
    engine.close()


def test_disk_path_under_a_file_degrades_and_l1_serves(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    pool = make_pool(128)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        engine = make_engine(blocker / "cache")
        toks = tokens(256)
        assert store_all(engine, pool, toks) == 256
        engine.tiers.flush()
        dst = list(range(64, 80))
        assert load_all(engine, pool, toks, dst, pin=1) == 256
    assert torch.equal(pool[dst], pool[:16])
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot be written" in m for m in messages)
    assert engine.snapshot().tier("disk").writes == 0
    engine.close()


def test_read_only_directory_degrades(tmp_path: Path, monkeypatch, caplog) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    probe = root / "probe"
    try:
        probe.write_bytes(b"x")  # root ignores the mode bits: simulate what a read-only dir does
        probe.unlink()
        real_open = os.open

        def denied(path, flags, *a):  # type: ignore[no-untyped-def]
            if flags & os.O_CREAT and str(path).startswith(str(root)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a)

        monkeypatch.setattr(disk_store.os, "open", denied)
    except PermissionError:
        pass
    try:
        pool = make_pool(128)
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            engine = make_engine(root)
            toks = tokens(128)
            store_all(engine, pool, toks)
            engine.tiers.flush()
            assert engine.lookup(space_of(pool), toks) == 128
        assert any("cannot be written" in r.getMessage() for r in caplog.records)
        assert not chunk_files(root)
        engine.close()
    finally:
        root.chmod(0o700)


def test_l1_smaller_than_the_working_set_is_served_from_disk(tmp_path: Path) -> None:
    pool = make_pool(256)
    # L1 holds 4 chunks; the working set is 12. (A queue of 4 chunks: the default is a quarter of L1.)
    engine = make_engine(tmp_path, cpu_chunks=4, tier_write_queue_bytes=4 * CHUNK_BYTES)
    prompts = [tokens(256, 100_000 * i) for i in range(3)]
    for i, toks in enumerate(prompts):
        store_all(engine, pool, toks, first_block=16 * i)
        assert engine.tiers.flush()
    assert engine.l1.evictions >= 8 and engine.snapshot().tier("disk").chunks == 12
    for round_ in range(2):
        for i, toks in enumerate(prompts):
            dst = list(range(128 + 16 * i, 144 + 16 * i))
            pool[dst] = 0
            assert load_all(engine, pool, toks, dst, pin=(round_, i)) == 256
            assert torch.equal(pool[dst], pool[16 * i : 16 * i + 16])
    assert engine.snapshot().tier("disk").hits >= 12
    assert engine.l1.pinned_keys() == []
    engine.close()


def _blocked_writes(monkeypatch) -> threading.Event:
    gate = threading.Event()
    original = DiskStore.write

    def write(self, *a, **kw):  # type: ignore[no-untyped-def]
        assert gate.wait(30)
        return original(self, *a, **kw)

    monkeypatch.setattr(DiskStore, "write", write)
    return gate


def test_store_never_waits_for_the_disk(tmp_path: Path, monkeypatch) -> None:
    gate = _blocked_writes(monkeypatch)
    pool = make_pool(128)
    engine = make_engine(tmp_path)
    toks = tokens(256)
    assert store_all(engine, pool, toks) == 256  # returns while the writer is stuck
    assert engine.lookup(space_of(pool), toks) == 256
    assert len(engine.l1.pinned_keys()) >= 3  # queued chunks keep their L1 slots
    gate.set()
    assert engine.tiers.flush()
    assert engine.l1.pinned_keys() == [] and len(chunk_files(tmp_path)) == 4
    engine.close()


def test_full_queue_drops_writes_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    gate = _blocked_writes(monkeypatch)
    pool = make_pool(128)
    engine = make_engine(tmp_path, tier_write_queue_bytes=CHUNK_BYTES)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert store_all(engine, pool, tokens(512)) == 512
    assert dropped_writes(engine) >= 6  # at most one being written and one queued
    assert any("queue is full" in r.getMessage() for r in caplog.records)
    gate.set()
    assert engine.tiers.flush()
    assert engine.l1.pinned_keys() == [] and len(engine.l1) == 8
    engine.close()


def test_close_flushes_queued_writes(tmp_path: Path, monkeypatch) -> None:
    gate = _blocked_writes(monkeypatch)
    pool = make_pool(128)
    # close() waits up to blocking_timeout_secs: far longer than the gate stays shut, even on a busy machine.
    engine = make_engine(tmp_path, blocking_timeout_secs=120.0)
    toks = tokens(384)
    store_all(engine, pool, toks)
    threading.Timer(0.2, gate.set).start()
    engine.close()  # waits for the queue
    assert len(chunk_files(tmp_path)) == 6 and engine.l1.pinned_keys() == []
    monkeypatch.undo()
    again = make_engine(tmp_path)
    assert again.lookup(space_of(pool), toks) == 384
    again.close()


def test_interpreter_exit_flushes_without_close(tmp_path: Path) -> None:
    args = {"disk": str(tmp_path), "tokens": 512, "slow": 0.02}
    assert run_tier_proc("store", args) == {"stored": 512}
    assert len(chunk_files(tmp_path)) == 8  # written by the atexit hook while the process exited
    pool = make_pool(128)
    engine = make_engine(tmp_path)
    dst = list(range(64, 96))
    assert load_all(engine, pool, tokens(512), dst, pin=1) == 512
    assert torch.equal(pool[dst], pool[:32])
    engine.close()


def test_disk_cap_is_respected(tmp_path: Path) -> None:
    pool = make_pool(128)
    engine = make_engine(tmp_path, disk_chunks=3)
    store_all(engine, pool, tokens(384))
    engine.tiers.flush()
    disk = disk_files_of(engine)
    assert len(disk) == 3 and disk.used_bytes <= disk.capacity_bytes
    assert sum(p.stat().st_size for p in chunk_files(tmp_path)) == disk.used_bytes
    assert disk.evictions == 3
    engine.close()


def test_tail_chunks_and_multiple_ranks_come_back_from_disk(tmp_path: Path) -> None:
    pool = make_pool(128)
    toks = tokens(100)  # one chunk + a 32-token tail
    # (+ half a chunk of L1: a tiny L1 is one slab, and a tail chunk needs a slot of its own size)
    with make_engine(tmp_path, save_unfull_chunk=True, cpu_chunks=64.5) as first:
        assert store_all(first, pool, toks[:96]) == 96
    second = make_engine(tmp_path, save_unfull_chunk=True, cpu_chunks=64.5)
    space = space_of(pool)
    assert second.lookup(space, toks, pin_id=1) == 96
    dst = list(range(40, 47))
    assert second.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 96), pin_id=1) == 96
    assert torch.equal(pool[dst[:6]], pool[:6])
    second.close()

    space2 = space_of(pool, world_size=2)
    other = tmp_path / "ranks"
    with make_engine(other) as first:
        for rank in (0, 1):
            first.store(
                space2,
                rank,
                pool,
                BlockTransfer(tokens(128), None, list(range(8 * rank, 8 * rank + 8)), 0, 128),
            )
    second = make_engine(other)
    assert second.lookup(space2, tokens(128), ranks=(0, 1), pin_id="r") == 128
    assert len(second.l1.pinned_keys()) == 4
    for rank in (0, 1):
        dst = list(range(60 + 8 * rank, 68 + 8 * rank))
        assert (
            second.retrieve(space2, rank, pool, BlockTransfer(tokens(128), None, dst, 0, 128), pin_id="r")
            == 128
        )
        assert torch.equal(pool[dst], pool[8 * rank : 8 * rank + 8])
    assert second.l1.pinned_keys() == []
    second.close()


def test_startup_scan_of_many_files_shows_progress(tmp_path: Path, monkeypatch, capsys) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    for i in range(5):
        store.write(NS, key(i), 1, payload(i, 100))
    monkeypatch.setattr(disk_scan, "PROGRESS_MIN_FILES", 3)
    again = DiskStore(tmp_path, 1 << 20)
    assert len(again) == 5 and again.last_scan.valid == 5
    assert "LMCache disk index" in capsys.readouterr().err
    background = DiskStore(tmp_path, 1 << 20, scan=False)
    background.start_scan()  # in the background the status says how far it got; no bar in the logs
    assert background.wait_scanned(30) and len(background) == 5
    assert "LMCache disk index" not in capsys.readouterr().err


def test_chunks_of_an_older_key_format_are_removed_at_startup(tmp_path: Path, monkeypatch) -> None:
    """After an upgrade that changes the key format (docs/tiers.md), the old files can never be hit:
    the next start removes them instead of keeping or serving them."""
    from lmcache.storage import chunk_format

    with monkeypatch.context() as old:
        old.setattr(chunk_format, "FORMAT_VERSION", chunk_format.FORMAT_VERSION - 1)
        store = DiskStore(tmp_path, capacity_bytes=1 << 20)
        assert store.write(NS, key(1), 7, payload(1)) is not None
        assert len(chunk_files(tmp_path)) == 1
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert store.last_scan.removed == 1
    assert chunk_files(tmp_path) == []
    assert store.lookup(NS, key(1)) is None


def test_a_write_after_close_writes_nothing_and_leaves_the_directory_free(tmp_path: Path) -> None:
    """A write-behind thread the engine's close did not wait for must not scan and claim the
    directory again: the next server's store would find it taken."""
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert store.write(NS, key(1), 7, payload(1)) is not None
    store.close()
    assert store.write(NS, key(2), 7, payload(2)) is None
    assert store.scan().files == 0 and store.problem is None  # closed: no scan, no claim
    successor = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert successor.problem is None
    assert successor.write(NS, key(3), 7, payload(3)) is not None
    assert read(successor, key(1)) == payload(1).tobytes() and read(successor, key(2)) is None
    successor.close()
