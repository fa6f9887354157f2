"""The disk tier's start-up scan runs in the background (issue 14): the engine starts at once, the tier
serves what is indexed so far, and writes, evictions and close() during the scan stay correct.

Each race is provoked at a fixed point by wrapping :func:`lmcache.storage.disk_scan.check_file`
(called for each chunk file, in the scan's thread, before the scan indexes or removes it)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from disk_files import NS, SIZE, N, key, on_disk, payload, read_key
from tier_helpers import make_engine

from lmcache.metrics import health_report
from lmcache.stats import decode_snapshot, encode_snapshot, summary_lines
from lmcache.storage import disk_scan
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.lower_tier import FetchStatus

SCAN_THREAD = "lmcache-disk-scan"


def written(root: Path, *ids: int) -> dict[Path, int]:
    """Chunk files of ``ids`` under ``root`` (written by a store that is then closed): path -> id."""
    store = DiskStore(root, 1 << 20)
    for i in ids:
        assert store.write(NS, key(i), 7, payload(i)) is not None
    store.close()
    return {store.path_for(NS, key(i)): i for i in ids}


def on_check(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int, Path, Any], None]) -> None:
    """Call ``hook(n, path, result)`` after the scan checked its ``n``-th chunk file (from 1), before
    it indexes or removes the file."""
    real = disk_scan.check_file
    count = 0

    def checked(path: Path, *args: Any) -> Any:
        nonlocal count
        result = real(path, *args)
        count += 1
        hook(count, path, result)
        return result

    monkeypatch.setattr(disk_scan, "check_file", checked)


def test_the_engine_starts_before_the_scan_and_serves_what_is_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Construction scanned every file before returning (issue 14: a big local_disk delayed the
    start); now the scan runs in its own thread, a chunk not reached yet is a miss, and status, stats
    and /health say how far it got."""
    ids = written(tmp_path, 1, 2, 3)
    first: list[int] = []
    threads: list[str] = []
    reached, go = threading.Event(), threading.Event()

    def hook(n: int, path: Path, result: Any) -> None:
        threads.append(threading.current_thread().name)
        if n == 1:
            first.append(ids[path])
        if n == 2:
            reached.set()
            if threads[-1] == SCAN_THREAD:  # never block the constructing thread
                assert go.wait(30)

    on_check(monkeypatch, hook)
    engine = make_engine(tmp_path, scanned=False)
    try:
        assert reached.wait(30)
        assert threads == [SCAN_THREAD, SCAN_THREAD]
        tier = engine.tiers.tiers[0]
        assert isinstance(tier, DiskTier)
        snap = engine.snapshot()
        assert snap.tier("disk").healthy and snap.tier("disk").state == "scanning (1 files indexed so far)"
        healthy, body = health_report(snap)
        assert healthy and body["notes"] == [f"disk tier {tier.where}: scanning (1 files indexed so far)"]
        assert any(": up, scanning (1 files indexed so far);" in line for line in summary_lines(snap))
        assert decode_snapshot(encode_snapshot(snap)) == snap  # what `lmcache stats` gets from a server
        keys = [key(i) for i in (1, 2, 3)]
        assert tier.contains(NS, keys) == [i == first[0] for i in (1, 2, 3)]
        slots = [bytearray(N) for _ in keys]
        statuses = tier.fetch_into(NS, keys, lambda i, n, t: memoryview(slots[i]))
        assert statuses == [FetchStatus.OK if i == first[0] else FetchStatus.MISSING for i in (1, 2, 3)]
        assert slots[first[0] - 1] == bytes(payload(first[0]))
        go.set()
        assert tier.wait_scanned(30)
        assert tier.contains(NS, keys) == [True] * 3 and tier.status().state is None
        assert health_report(engine.snapshot())[1]["notes"] == []
    finally:
        go.set()
        engine.close()


def test_a_chunk_rewritten_during_the_scan_is_counted_once_with_its_new_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = written(tmp_path, 1, 2)
    store = DiskStore(tmp_path, 1 << 20, scan=False)
    rewritten: list[int] = []

    def hook(n: int, path: Path, result: Any) -> None:
        if n == 1:  # the scan has read the old file; a write replaces it before the scan indexes it
            rewritten.append(ids[path])
            assert store.write(NS, key(ids[path]), 9, payload(ids[path])) is not None

    on_check(monkeypatch, hook)
    store.start_scan()
    assert store.wait_scanned(30)
    assert store.lookup(NS, key(rewritten[0])).num_tokens == 9  # the write's entry, not the scan's
    assert len(store) == 2 and store.used_bytes == on_disk(tmp_path) == 2 * SIZE
    store.close()


def test_a_chunk_written_and_evicted_during_the_scan_is_not_indexed_from_the_scans_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan read a valid file, then a write replaced it and a later write evicted it (unlinked):
    the scan indexed its older look all the same, counting bytes of a file no longer on disk."""
    ids = written(tmp_path, 1, 2)
    store = DiskStore(tmp_path, 3 * SIZE, scan=False)
    gone: list[int] = []
    indexed_then: list[bool] = []

    def hook(n: int, path: Path, result: Any) -> None:
        if n == 1:
            gone.append(ids[path])
            for i in (ids[path], 10, 11, 12):  # the fourth write evicts the first (LRU)
                assert store.write(NS, key(i), 7, payload(i)) is not None
            assert store.lookup(NS, key(ids[path])) is None and not path.exists()
        if n == 2:  # the first file's turn to be indexed has passed
            entries = [store.lookup(ns, k) for ns, k in store.entries()]
            indexed_then.append(
                store.used_bytes == sum(e.size for e in entries) and all(e.path.exists() for e in entries)
            )

    on_check(monkeypatch, hook)
    store.start_scan()
    assert store.wait_scanned(30)
    assert indexed_then == [True]
    assert store.lookup(NS, key(gone[0])) is None
    assert store.used_bytes == on_disk(tmp_path) == 3 * SIZE and len(store) == 3
    store.close()


def test_the_scan_never_removes_a_file_a_write_put_in_place_after_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the scan found invalid (a chunk a crash zero-filled) was written afresh before the scan
    removed it: the scan removed the new, valid, indexed file."""
    path = next(iter(written(tmp_path, 1)))
    path.write_bytes(bytes(SIZE))
    store = DiskStore(tmp_path, 1 << 20, scan=False)

    def hook(n: int, checked: Path, result: Any) -> None:
        assert isinstance(result, disk_scan.FileStamp)  # invalid, ours: the scan will remove it
        assert store.write(NS, key(1), 7, payload(1)) is not None

    on_check(monkeypatch, hook)
    store.start_scan()
    assert store.wait_scanned(30)
    assert path.exists() and read(store, 1) == bytes(payload(1))
    assert store.last_scan.removed == 0 and store.used_bytes == on_disk(tmp_path) == SIZE
    store.close()


def test_the_scan_never_removes_the_temporary_file_of_a_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write stuck long enough for its temporary file to look stale by age: a scan meanwhile
    removed it, and the write failed when renaming it into place."""
    store = DiskStore(tmp_path, 1 << 20)
    real_replace = os.replace
    renaming, go = threading.Event(), threading.Event()
    temporaries: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        temporaries.append(str(src))
        renaming.set()
        assert go.wait(30)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    results: list[object] = []

    def write() -> None:
        try:
            results.append(store.write(NS, key(1), 7, payload(1)))
        except OSError as exc:
            results.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert renaming.wait(30)
        old = os.stat(temporaries[0]).st_mtime - 2 * disk_scan.STALE_TMP_S
        os.utime(temporaries[0], (old, old))
        report = store.scan()
    finally:
        go.set()
        writer.join()
    assert report.removed == 0 and isinstance(results[0], int)
    assert read(store, 1) == bytes(payload(1)) and store.used_bytes == on_disk(tmp_path) == SIZE
    store.close()


def test_close_stops_the_scan_before_its_next_file_and_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = written(tmp_path, 1, 2, 3, 4, 5)
    store = DiskStore(tmp_path, 1 << 20, scan=False)
    stops: list[threading.Event] = []
    threads: list[threading.Thread] = []
    real_run = disk_scan.IndexScan.run

    def run(self: disk_scan.IndexScan, stop: threading.Event) -> Any:
        stops.append(stop)
        threads.append(threading.current_thread())
        return real_run(self, stop)

    monkeypatch.setattr(disk_scan.IndexScan, "run", run)
    reached = threading.Event()

    def hook(n: int, path: Path, result: Any) -> None:
        if n == 2:
            reached.set()
            assert stops[0].wait(30)  # until close() asks the scan to stop

    on_check(monkeypatch, hook)
    store.start_scan()
    assert reached.wait(30)
    assert store.scan_progress == 1
    store.close()
    assert threads[0].name == SCAN_THREAD and not threads[0].is_alive()
    assert store.scan_done.is_set() and store.last_scan.stopped and len(store) == 2
    assert store.scan_progress is None
    assert {p for p in ids if p.exists()} == set(ids)  # nothing removed or evicted
    again = DiskStore(tmp_path, 1 << 20)  # the directory was released; the next start finds all
    assert len(again) == 5
    again.close()


def test_found_chunks_go_oldest_first_ahead_of_chunks_written_during_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is enforced once the scan has counted everything, evicting the oldest files first;
    a chunk written during the scan is newer than all of them."""
    ids = written(tmp_path, 1, 2, 3)
    by_id = {i: p for p, i in ids.items()}
    for age, i in ((300, 2), (200, 3), (100, 1)):  # 2 is the oldest, 1 the newest
        stamp = by_id[i].stat().st_mtime - age
        os.utime(by_id[i], (stamp, stamp))

    def hook(n: int, path: Path, result: Any) -> None:
        if n == 1:
            assert store.write(NS, key(9), 7, payload(9)) is not None

    on_check(monkeypatch, hook)
    store = DiskStore(tmp_path, 3 * SIZE, scan=False)
    store.start_scan()
    assert store.wait_scanned(30)
    assert store.last_scan.evicted == 1 and store.lookup(NS, key(2)) is None  # 4 chunks over a cap of 3
    assert store.used_bytes == on_disk(tmp_path) == 3 * SIZE
    for new, evicted in ((10, 3), (11, 1), (12, 9)):
        assert store.write(NS, key(new), 7, payload(new)) is not None
        assert store.lookup(NS, key(evicted)) is None
    store.close()


def read(store: DiskStore, i: int) -> bytes | None:
    return read_key(store, key(i))
