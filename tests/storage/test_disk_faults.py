"""The disk tier under faults and sharing: a failing call is a miss or a dropped write, the byte count
matches the files on disk, a directory that is not ours is never written, a read gets the whole
file it opened or a miss."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from disk_files import NS, SIZE, N, key, on_disk, payload
from disk_files import read_key as read
from tier_helpers import make_engine

from lmcache.backoff import Backoff
from lmcache.storage import disk_store
from lmcache.storage.disk_store import MARKER, TIER_DIR, TMP_SUFFIX, DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.lower_tier import ChecksumMemo, WriteItem


def fail(err: int) -> Callable[..., Any]:
    def raise_(*args: object, **kwargs: object) -> Any:
        raise OSError(err, os.strerror(err))

    return raise_


@pytest.mark.parametrize("call", ["pwrite", "writev", "fsync", "close", "replace"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_leaves_no_file_and_no_count(tmp_path: Path, monkeypatch, call: str, err: int) -> None:
    store = DiskStore(tmp_path, 3 * SIZE, fsync=True)
    assert store.write(NS, key(1), 7, payload(1)) is not None
    real_close = os.close
    if call == "close":  # the fd is closed all the same, then the error is raised (as NFS does)
        monkeypatch.setattr(disk_store.os, "close", lambda fd: (real_close(fd), fail(err)())[1])
    else:
        monkeypatch.setattr(disk_store.os, call, fail(err))
    # pwrite: the payload is hashed as it is written; writev: its checksum is already known.
    with pytest.raises(OSError) as raised:
        store.write(NS, key(2), 7, payload(2), None if call == "pwrite" else 123)
    monkeypatch.undo()
    assert raised.value.errno == err
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}")) and store.lookup(NS, key(2)) is None
    assert store.used_bytes == on_disk(tmp_path) == SIZE
    assert read(store, key(1)) == bytes(payload(1))


def test_a_write_fault_drops_the_write_and_backs_off_the_tier(tmp_path: Path, monkeypatch) -> None:
    tier = DiskTier(DiskStore(tmp_path, 1 << 20), backoff=Backoff(30, 60))
    engine = make_engine(None, cpu_chunks=8)  # an L1 to take a chunk from
    try:
        chunk = engine.l1.reserve(key(1), N, 7)
        assert chunk is not None
        engine.l1.commit(key(1))
        monkeypatch.setattr(disk_store.os, "replace", fail(errno.EIO))
        outcome = tier.write([WriteItem(NS, key(1), chunk)], ChecksumMemo())
        assert (outcome.written, outcome.dropped) == (0, 1)
        assert not tier.status().healthy and not tier.accepts_writes()
        assert tier.store.used_bytes == 0 and not list(tmp_path.rglob("*.tmp"))
    finally:
        engine.close()
        tier.close()


def test_a_refused_tier_directory_is_never_written(tmp_path: Path) -> None:
    """An unmarked, non-empty ``lmcache-kv`` (someone else's) was skipped by the scan, then written to
    by the first write all the same."""
    root = tmp_path / TIER_DIR
    root.mkdir()
    (root / "data").write_bytes(b"someone else's")
    store = DiskStore(tmp_path, 1 << 20)
    with pytest.raises(PermissionError):
        store.write(NS, key(1), 7, payload(1))
    assert isinstance(store.problem, PermissionError)
    tier = DiskTier(store, backoff=Backoff(30, 60))  # starts down, without probing the directory
    assert not tier.status().healthy
    tier.close()
    assert sorted(p.name for p in root.rglob("*")) == ["data"]


def test_a_tier_directory_removed_while_running_is_made_again(tmp_path: Path) -> None:
    """Before: every later write failed (ENOENT, not even a back-off) and the index kept counting
    the removed files."""
    store = DiskStore(tmp_path, 1 << 20)
    for i in (1, 2):
        store.write(NS, key(i), 7, payload(i))
    shutil.rmtree(tmp_path / TIER_DIR)
    assert store.write(NS, key(3), 7, payload(3)) is not None
    assert store.used_bytes == on_disk(tmp_path) == SIZE and len(store) == 1
    assert (tmp_path / TIER_DIR / MARKER).is_file()
    assert read(store, key(3)) == bytes(payload(3)) and read(store, key(1)) is None


def test_an_eviction_that_cannot_remove_its_file_keeps_it_counted(tmp_path: Path, monkeypatch) -> None:
    """Directory made read-only (EROFS, EACCES) under a full store: the victim's file stays, so its
    bytes stay counted; before, they were forgotten and the cap was exceeded once writable again."""
    store = DiskStore(tmp_path, 2 * SIZE)
    for i in (1, 2):
        store.write(NS, key(i), 7, payload(i))
    monkeypatch.setattr(disk_store.os, "unlink", fail(errno.EROFS))
    with pytest.raises(OSError):
        store.write(NS, key(3), 7, payload(3))
    monkeypatch.undo()
    assert store.used_bytes == on_disk(tmp_path) == 2 * SIZE and len(store) == 2
    assert store.write(NS, key(3), 7, payload(3)) is not None  # writable again: evicts as usual
    assert store.used_bytes == on_disk(tmp_path) == 2 * SIZE


def test_a_read_that_lost_a_race_with_a_rewrite_keeps_its_file_counted(tmp_path: Path, monkeypatch) -> None:
    """A read of an evicted file (not found) came after the chunk was written again: it dropped the
    new file's entry, leaving the file on disk uncounted."""
    store = DiskStore(tmp_path, 1 << 20)
    store.write(NS, key(1), 7, payload(1))
    old = store.lookup(NS, key(1))
    assert old is not None
    store.clear()  # evicted ...
    store.write(NS, key(1), 7, payload(1))  # ... and written again before the reader opened it
    monkeypatch.setattr(disk_store, "open", fail(errno.ENOENT), raising=False)
    assert not store.read_into(NS, key(1), old, memoryview(bytearray(N)))
    monkeypatch.undo()
    assert store.lookup(NS, key(1)) is not None
    assert store.used_bytes == on_disk(tmp_path) == SIZE


class _File(io.RawIOBase):
    """A chunk file read through ``readinto``: at most ``piece`` bytes per call, EIO at ``eio_at``."""

    def __init__(self, path: Path, piece: int, eio_at: int | None = None) -> None:
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._piece, self._eio_at = piece, eio_at

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._eio_at is not None and self._f.tell() >= self._eio_at:
            raise OSError(errno.EIO, "Input/output error")
        return self._f.readinto(memoryview(b)[: self._piece])

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


def test_short_reads_are_not_a_truncated_file(tmp_path: Path, monkeypatch) -> None:
    """A raw read may return fewer bytes than asked for: the header reader took that as a truncated
    (corrupt) file and removed a valid chunk."""
    store = DiskStore(tmp_path, 1 << 20)
    store.write(NS, key(1), 7, payload(1))
    monkeypatch.setattr(disk_store, "open", lambda p, *a, **kw: _File(p, 7), raising=False)
    assert read(store, key(1)) == bytes(payload(1))
    assert store.corrupt_removed == 0 and store.path_for(NS, key(1)).exists()


def test_an_io_error_mid_read_is_a_miss_and_the_bad_file_is_dropped(tmp_path: Path, monkeypatch) -> None:
    """EIO (a bad sector) was a miss that stayed indexed: every lookup found it and failed again."""
    store = DiskStore(tmp_path, 1 << 20)
    store.write(NS, key(1), 7, payload(1))
    monkeypatch.setattr(disk_store, "open", lambda p, *a, **kw: _File(p, 256, SIZE - N // 2), raising=False)
    assert read(store, key(1)) is None
    monkeypatch.undo()
    assert store.lookup(NS, key(1)) is None and store.used_bytes == on_disk(tmp_path) == 0
    assert store.write(NS, key(1), 7, payload(1)) is not None  # written afresh
    assert read(store, key(1)) == bytes(payload(1))


def test_a_read_gets_the_whole_file_it_opened_while_it_is_evicted(tmp_path: Path, monkeypatch) -> None:
    """The chunk is evicted (its file unlinked) and another written in the middle of the read."""
    store = DiskStore(tmp_path, SIZE)
    store.write(NS, key(1), 7, payload(1))
    evicted = threading.Event()

    class Evicting(_File):
        def readinto(self, b: Any) -> int:
            if not evicted.is_set() and self._f.tell() > 0:
                evicted.set()
                assert store.write(NS, key(2), 7, payload(2)) is not None  # evicts key 1
                assert not store.path_for(NS, key(1)).exists()
            return super().readinto(b)

    monkeypatch.setattr(disk_store, "open", lambda p, *a, **kw: Evicting(p, 100), raising=False)
    assert read(store, key(1)) == bytes(payload(1))
    assert evicted.is_set() and store.lookup(NS, key(1)) is None
    assert store.used_bytes == on_disk(tmp_path) == SIZE


def test_two_stores_on_one_directory_are_warned_about(tmp_path: Path, caplog) -> None:
    """docs/tiers.md: one engine per directory. A second one was not noticed; now it is warned about
    (naming local_disk), and what they do to each other's files is a miss, never wrong bytes."""
    caplog.set_level(logging.WARNING, logger="lmcache")
    first = DiskStore(tmp_path, 1 << 20)
    assert "in use by another" not in caplog.text
    second = DiskStore(tmp_path, SIZE)
    assert "local_disk" in caplog.text and "in use by another" in caplog.text
    first.write(NS, key(1), 7, payload(1))
    second.write(NS, key(2), 7, payload(2))
    second.write(NS, key(3), 7, payload(3))  # evicts key 2 only: key 1 is not in its index
    assert read(first, key(1)) == bytes(payload(1)) and read(second, key(3)) == bytes(payload(3))
    first.close()
    second.close()
    caplog.clear()
    third = DiskStore(tmp_path, 1 << 20)  # both gone: no warning
    assert "in use by another" not in caplog.text and len(third) == 2
    third.close()


def test_engines_on_one_directory_warn_until_the_first_closes(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache")
    first = make_engine(tmp_path)
    second = make_engine(tmp_path)
    assert caplog.text.count("in use by another") == 1
    second.close()
    first.close()
    caplog.clear()
    make_engine(tmp_path).close()
    assert "in use by another" not in caplog.text


def test_a_temporary_file_of_an_earlier_process_with_our_pid_is_removed(tmp_path: Path) -> None:
    """A container restarts its server as the same pid (1, say): its torn temporary file looked like
    a live writer's and stayed, uncounted, until the next restart."""
    store = DiskStore(tmp_path, 1 << 20)
    store.write(NS, key(1), 7, payload(1))
    path = store.path_for(NS, key(1))
    del store  # (releases the directory)
    live = {t.ident for t in threading.enumerate()}
    dead_tid = next(t for t in range(1, 1 << 20) if t not in live)
    torn = path.with_name(f"{path.name}.{os.getpid()}.{dead_tid}{TMP_SUFFIX}")
    writing = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    for tmp in (torn, writing):
        tmp.write_bytes(b"LMKV")
    again = DiskStore(tmp_path, 1 << 20)
    assert not torn.exists() and writing.exists()  # this thread may be writing it now
    assert again.last_scan.removed == 1 and len(again) == 1
