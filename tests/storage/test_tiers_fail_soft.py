"""A lower tier's mistake never switches the cache off: misses from that tier, L1 keeps serving."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tier_helpers import make_engine, make_pool, space_of, store_all, tokens

from lmcache.backoff import Backoff
from lmcache.keys import ChunkKey
from lmcache.memory import HostArena
from lmcache.metrics import health_report
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_store import MARKER, TIER_DIR, DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.lower_tier import (
    ChecksumMemo,
    FetchStatus,
    LowerTier,
    Sink,
    TierStatus,
    WriteItem,
    WriteOutcome,
)
from lmcache.storage.remote_store import RemoteStore
from lmcache.storage.tiers import TierManager


def test_unwritable_disk_directory_degrades_health_at_start_and_l1_serves(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="lmcache")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    engine = make_engine(disk=blocker / "l2")  # mkdir under a regular file fails, also as root
    healthy, body = health_report(engine.snapshot())
    assert not healthy and body["tiers"]["disk"] is False and body["tiers"]["l1"] is True
    assert "cannot be written" in caplog.text
    pool = make_pool()
    toks = tokens(128)
    assert store_all(engine, pool, toks) == 128
    assert engine.lookup(space_of(pool), toks) == 128
    engine.tiers.close()


def test_writable_disk_directory_is_healthy_at_start(tmp_path: Path) -> None:
    engine = make_engine(disk=tmp_path / "l2")
    assert health_report(engine.snapshot())[0]
    # The write probe leaves nothing behind: the tier's own directory holds only its marker.
    assert [p.name for p in (tmp_path / "l2").iterdir()] == [TIER_DIR]
    assert [p.name for p in (tmp_path / "l2" / TIER_DIR).iterdir()] == [MARKER]
    engine.tiers.close()


def test_missing_redis_package_is_named_with_the_install_command(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'lmcache-trtllm\[redis\]'"):
        make_engine(remote_url="redis://127.0.0.1:1")


def test_unreachable_remote_is_a_miss_a_warning_and_degraded_health(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="lmcache")
    engine = make_engine(remote_url="redis://127.0.0.1:1")  # nothing listens on port 1
    pool = make_pool()
    stored, missing = tokens(128), tokens(128, offset=10_000)
    assert store_all(engine, pool, stored) == 128
    assert engine.lookup(space_of(pool), stored) == 128  # L1 still answers
    assert engine.lookup(space_of(pool), missing) == 0  # the remote's failure is a miss
    healthy, body = health_report(engine.snapshot())
    assert not healthy and body["tiers"]["remote"] is False
    # The first failure may be met by the write-behind thread, which warns on its own time.
    message = "remote tier redis://127.0.0.1:1 unavailable"
    deadline = time.monotonic() + 30
    while message not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.lookup(space_of(pool), missing)  # failing again within the interval: not logged again
    engine.tiers.close()
    assert caplog.text.count(message) == 1  # rate-limited


def test_any_exception_of_the_remote_client_is_a_miss(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken_client(self: RemoteStore, timeout: float) -> object:
        raise ValueError("a bug in a lower tier")

    monkeypatch.setattr(RemoteStore, "_make_client", broken_client)
    engine = make_engine(remote_url="redis://127.0.0.1:1")
    pool = make_pool()
    assert engine.lookup(space_of(pool), tokens(128, offset=20_000)) == 0
    assert store_all(engine, pool, tokens(128)) == 128
    assert engine.lookup(space_of(pool), tokens(128)) == 128
    engine.tiers.close()


NS = Namespace("m", b"float32/L2/KV2/E128/T8")  # 2048-byte rows of 8 tokens
ROWS = 4 * 2048  # a chunk of 32 tokens


def key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32, 1, 0)


def disk_with(root: Path, *ids: int) -> DiskTier:
    store = DiskStore(root, 1 << 20)
    for i in ids:
        assert store.write(NS, key(i), 32, memoryview(np.full(ROWS, i, dtype=np.uint8))) is not None
    return DiskTier(store, backoff=Backoff(0.05, 0.2))


class StubTier(LowerTier):
    """Holds every chunk; ``contains`` sets ``entered``, then waits for ``gate``. With ``broken`` every
    call raises; ``fetch_into`` always does, after its sink handed out a slot."""

    name = "stub"
    where = "test"

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError("a bug in a lower tier")

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        self._check()
        return False

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        self.entered.set()
        self.gate.wait(10)
        self._check()
        return [not self.broken] * len(keys)

    def accepts_writes(self) -> bool:
        self._check()
        return False

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        return WriteOutcome(0, 0, len(items))

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        assert sink(0, ROWS, 32) is not None
        raise RuntimeError("a bug in a lower tier, after a slot was reserved")

    def status(self) -> TierStatus:
        return TierStatus(True, None, 0, 0)

    def close(self) -> None:
        self.gate.set()


def test_closing_the_tiers_under_a_promotion_neither_raises_nor_leaks_slots(tmp_path: Path) -> None:
    l1 = CpuStore(HostArena(16 * ROWS, pinned=False))
    slow = StubTier()
    slow.gate.clear()  # its lookup round trip lasts until the tiers are closed
    tiers = TierManager(l1, [disk_with(tmp_path, 1, 2), slow])
    result: list[object] = []
    lookup = threading.Thread(
        target=lambda: result.append(tiers.promote_prefix(NS, [[key(1)], [key(2)], [key(3)]], [32] * 3))
    )
    lookup.start()
    assert slow.entered.wait(10)
    tiers.close(timeout=1)  # e.g. the engine shut down while a request is looked up
    lookup.join(10)
    assert result == [(2, [key(1), key(2)])]  # the disk reads ran on the caller's thread
    assert not l1.reserved(key(1)) and not l1.reserved(key(2))


def test_a_closed_disk_tier_still_reads(tmp_path: Path) -> None:
    disk = disk_with(tmp_path, 1, 2, 3)
    disk.close()
    slots = [np.zeros(ROWS, dtype=np.uint8) for _ in range(3)]
    statuses = disk.fetch_into(NS, [key(1), key(2), key(3)], lambda i, n, t: memoryview(slots[i]))
    assert statuses == [FetchStatus.OK] * 3 and [int(s[0]) for s in slots] == [1, 2, 3]


def test_a_tier_that_raises_is_a_miss_and_its_slots_are_dropped(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="lmcache")
    l1 = CpuStore(HostArena(16 * ROWS, pinned=False))
    broken = StubTier()
    tiers = TierManager(l1, [broken])
    assert tiers.promote_prefix(NS, [[key(1)]], [32]) == (0, [])  # fetch_into raised after a reserve
    assert not l1.reserved(key(1)) and len(l1) == 0
    broken.broken = True  # now every call raises
    assert tiers.present(NS, [key(1)]) == [False]
    chunk = l1.reserve(key(2), ROWS, 32)
    assert chunk is not None
    l1.commit(key(2))
    tiers.write_behind(NS, [key(2)])  # a store's write-behind: dropped, not raised
    assert tiers.snapshots()[0].dropped_writes == 1
    tiers.close()
    assert "raised from fetch_into" in caplog.text and "raised from contains" in caplog.text


def test_a_promotion_that_fails_in_our_own_code_is_a_miss_and_holds_nothing(
    tmp_path: Path, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """The tiers' calls are guarded; a fault between them (here, L1 refusing a commit) must not raise
    into the lookup either, and what the window held (a pin of a chunk L1 had, the slots reserved for
    the others) is given back: nothing stays pinned or reserved for no one."""
    caplog.set_level(logging.WARNING, logger="lmcache")
    l1 = CpuStore(HostArena(16 * ROWS, pinned=False))
    assert l1.reserve(key(0), ROWS, 32) is not None
    l1.commit(key(0))
    tiers = TierManager(l1, [disk_with(tmp_path, 1, 2)])
    commit = l1.commit

    def refuse(key: object, *args: object, **kwargs: object) -> None:
        raise KeyError(key)

    monkeypatch.setattr(l1, "commit", refuse)
    positions = [[key(0)], [key(1)], [key(2)]]
    done, pins = tiers.promote_prefix(NS, positions, [32] * 3)
    assert done == 0 and "promoting chunks from the tiers failed" in caplog.text
    tiers.unpin(pins)  # as its caller does: the pins handed over before the fault
    assert l1.pinned_keys() == [] and not l1.reserved(key(1)) and not l1.reserved(key(2))
    monkeypatch.setattr(l1, "commit", commit)
    done, pins = tiers.promote_prefix(NS, positions, [32] * 3)  # promotable again
    assert done == 3
    tiers.unpin(pins)
    tiers.close()
