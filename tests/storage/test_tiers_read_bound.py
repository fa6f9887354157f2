"""A promotion waits for the lower tiers' reads at most ``lookup_timeout_ms``: a hung read (an NFS mount
that stopped answering, a Redis that never replies) costs the lookup the chunks it held up, never the
scheduler's thread. What the late read finally delivers verified is published into L1 (a slow tier still
promotes); its other slots are given back. Its threads never hold up the process's exit."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from tier_helpers import config, make_pool, space_of, store_all, tokens

from lmcache.backoff import Backoff
from lmcache.engine import CacheEngine
from lmcache.keys import ChunkKey
from lmcache.memory import HostArena
from lmcache.storage import tiers as tiers_module
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.fetch_threads import FetchThreads
from lmcache.storage.lower_tier import (
    ChecksumMemo,
    FetchStatus,
    LowerTier,
    Sink,
    TierStatus,
    WriteItem,
    WriteOutcome,
    payload_view,
)
from lmcache.storage.tiers import TierManager

SAFETY_S = 30.0
"""How long a test waits for what must happen at once; only reached when the code under test hangs."""


class HeldTier(LowerTier):
    """Chunks in a dict. While ``held``, every ``fetch_into`` reserves its first chunk's slot, sets
    ``entered``, and waits for ``release`` before it reads anything (a hung disk or Redis). While
    ``corrupt``, every chunk it writes is reported CORRUPT. ``asked``: the keys of each ``fetch_into``."""

    name = "held"
    where = "this test"

    def __init__(self) -> None:
        self.data: dict[tuple[Namespace, ChunkKey], tuple[bytes, int]] = {}
        self.lock = threading.Lock()
        self.held = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fetches = 0
        self.corrupt = False
        self.asked: list[list[ChunkKey]] = []
        self.fetched = threading.Event()
        """Set when a ``fetch_into`` returns."""

    def put(self, ns: Namespace, key: ChunkKey, payload: bytes, num_tokens: int) -> None:
        with self.lock:
            self.data[(ns, key)] = (payload, num_tokens)

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        return False

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        with self.lock:
            return [(ns, key) in self.data for key in keys]

    def accepts_writes(self) -> bool:
        return True

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        for item in items:
            item.chunk.wait_ready_on_host()
            self.put(item.ns, item.key, payload_view(item.chunk).tobytes(), item.chunk.num_tokens)
        return WriteOutcome(len(items), sum(i.chunk.nbytes for i in items), 0)

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        with self.lock:
            self.fetches += 1
            self.asked.append(list(keys))
            found = [self.data.get((ns, key)) for key in keys]
        out = []
        for i, item in enumerate(found):
            if item is None:
                out.append(FetchStatus.MISSING)
                continue
            buf = sink(i, len(item[0]), item[1])
            if self.held and i == 0:
                self.entered.set()
                assert self.release.wait(SAFETY_S)
            if buf is None:
                out.append(FetchStatus.SKIPPED)
                continue
            buf[:] = item[0]
            out.append(FetchStatus.CORRUPT if self.corrupt else FetchStatus.OK)
        self.fetched.set()
        return out

    def status(self) -> TierStatus:
        return TierStatus(True, None, 0, 0, chunks=len(self.data))

    def close(self) -> None:
        self.release.set()


def settles(predicate: Callable[[], bool]) -> bool:
    """Whether ``predicate`` holds within ``SAFETY_S`` (what a late read's thread does after its
    ``fetch_into`` returned, e.g. give its slot back, is seen here once it happened)."""
    deadline = time.monotonic() + SAFETY_S
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` on a thread (a hang then fails the test instead of hanging it): the thread, its result."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def engine_with(held: HeldTier, monkeypatch: pytest.MonkeyPatch, lookup_timeout_ms: float) -> CacheEngine:
    """An engine whose only lower tier is ``held``, made from the configuration as in production."""
    monkeypatch.setattr(tiers_module, "TIER_FACTORIES", (lambda _config: held,))
    engine = CacheEngine(config(lookup_timeout_ms=lookup_timeout_ms), pinned=False)
    engine.tiers = TierManager.from_config(engine.config, engine.l1)
    return engine


def test_the_bound_on_a_promotion_is_lookup_timeout_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_with(HeldTier(), monkeypatch, lookup_timeout_ms=250)
    assert engine.tiers is not None and engine.tiers.read_timeout_s == 0.25
    engine.tiers.close()


def test_a_hung_read_costs_the_lookup_its_chunks_within_the_bound_and_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmcache")
    held = HeldTier()
    engine = engine_with(held, monkeypatch, lookup_timeout_ms=500)
    assert engine.tiers is not None
    pool, toks = make_pool(), tokens(4 * 64)
    space = space_of(pool)
    assert store_all(engine, pool, toks) == len(toks)
    assert engine.tiers.flush(SAFETY_S) and len(held.data) == 4
    engine.l1.clear()  # L1 lost every chunk (evicted); the tier holds all four
    assert store_all(engine, pool, toks[:64]) == 64  # L1 holds the first one again
    assert engine.tiers.flush(SAFETY_S)  # its write-behind no longer pins it
    first = engine.l1.keys()
    one_chunk = engine.l1.snapshot().used_bytes

    held.held = True
    lookup, result = in_thread(lambda: engine.lookup(space, toks))
    lookup.join(SAFETY_S)
    if lookup.is_alive():
        held.release.set()
        pytest.fail("the lookup waited for a hung tier read")
    assert result == [64]  # the prefix L1 had; the chunks behind the hung read are misses
    assert held.entered.is_set() and not held.fetched.is_set()  # the read still hangs
    assert (
        caplog.text.count("the held tier (this test) did not answer a promotion's reads within 500 ms") == 1
    )

    # While that read hangs, lookups do not wait for the tier again: its chunks are misses at once.
    assert engine.lookup(space, toks) == 64 and held.fetches == 1
    assert engine.l1.pinned_keys() == []

    held.release.set()  # the hung read delivers at last: the chunk it read is published, unpinned
    assert settles(lambda: "the held tier's late reads have ended" in caplog.text)  # logged once settled
    assert engine.l1.snapshot().used_bytes == 2 * one_chunk
    second = sorted(set(engine.l1.keys()) - set(first))
    assert len(second) == 1 and engine.l1.pinned_keys() == []
    assert held.asked[0][0] == second[0]  # the chunk the hung read had its slot for

    held.held = False  # the tier answers again: a later lookup promotes the whole prefix
    assert engine.lookup(space, toks) == len(toks) and held.fetches == 2
    assert len(held.asked[1]) == 2 and second[0] not in held.asked[1]  # the second chunk: from L1
    assert engine.tiers.snapshots()[0].hits == 2 and engine.l1.pinned_keys() == []
    assert engine.l1.snapshot().used_bytes == 4 * one_chunk
    engine.tiers.close()


def test_a_promotion_in_time_promotes_the_whole_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldTier()
    engine = engine_with(held, monkeypatch, lookup_timeout_ms=60_000)
    assert engine.tiers is not None
    pool, toks = make_pool(), tokens(4 * 64)
    assert store_all(engine, pool, toks) == len(toks)
    assert engine.tiers.flush(SAFETY_S) and len(held.data) == 4
    engine.l1.clear()
    assert engine.lookup(space_of(pool), toks) == len(toks)
    assert held.fetches == 1 and engine.tiers.snapshots()[0].hits == 4 and len(engine.l1) == 4
    assert engine.l1.pinned_keys() == []
    engine.tiers.close()


NS = Namespace("m", b"float32/L2/KV2/E128/T8")  # 2048-byte rows of 8 tokens
ROWS = 4 * 2048  # a chunk of 32 tokens


def key(i: int) -> ChunkKey:
    return ChunkKey(bytes([i]) * 32, 1, 0)


def payload(i: int) -> bytes:
    return np.full(ROWS, i, dtype=np.uint8).tobytes()


def test_chunks_read_in_time_from_another_tier_are_promoted_up_to_the_hung_one(tmp_path: Path) -> None:
    """L1 has chunk 1; the disk (in time) has 2 and 4; the held tier (hung) has 3. The lookup gets 1-2;
    4, read in time but past the hole, is published unpinned; 3 is published unpinned once its late read
    ends, so the next promotion finds all four in L1 without asking the held tier again."""
    l1 = CpuStore(HostArena(16 * ROWS, pinned=False))
    assert l1.reserve(key(1), ROWS, 32) is not None
    l1.commit(key(1))
    one_chunk = l1.snapshot().used_bytes
    store = DiskStore(tmp_path, 1 << 20)
    for i in (2, 4):
        assert store.write(NS, key(i), 32, memoryview(np.frombuffer(payload(i), dtype=np.uint8))) is not None
    held = HeldTier()
    held.put(NS, key(3), payload(3), 32)
    held.held = True
    # A bound long enough for the disk's reads on a busy machine; the held read never ends in it.
    tiers = TierManager(l1, [DiskTier(store, backoff=Backoff(0.05, 0.2)), held], read_timeout_s=2.0)
    positions = [[key(i)] for i in (1, 2, 3, 4)]
    promote, result = in_thread(lambda: tiers.promote_prefix(NS, positions, [32] * 4))
    promote.join(SAFETY_S)
    if promote.is_alive():
        held.release.set()
        pytest.fail("the promotion waited for a hung tier read")
    assert result == [(2, [key(1), key(2)])]
    assert held.entered.is_set() and not held.fetched.is_set()
    assert l1.reserved(key(3)) and key(3) not in l1  # the hung read may still write into its slot
    assert key(4) in l1 and sorted(l1.pinned_keys()) == [key(1), key(2)]
    tiers.unpin([key(1), key(2)])
    chunk = l1.get(key(2))
    assert chunk is not None and bytes(payload_view(chunk)) == payload(2)

    held.release.set()
    assert settles(lambda: not l1.reserved(key(3)))
    assert key(3) in l1 and l1.snapshot().used_bytes == 4 * one_chunk and l1.pinned_keys() == []

    held.held = False
    assert tiers.promote_prefix(NS, positions, [32] * 4) == (4, [key(1), key(2), key(3), key(4)])
    assert held.fetches == 1  # 3 came from L1: the held tier was not read again
    chunk = l1.get(key(3))
    assert chunk is not None and bytes(payload_view(chunk)) == payload(3)
    tiers.unpin([key(i) for i in (1, 2, 3, 4)])
    tiers.close()


def late_read(held: HeldTier, l1: CpuStore) -> TierManager:
    """L1 has chunk 1, the held tier (hung) chunk 2: a promotion of both gets 1, gives the read of 2 up
    and returns, leaving that read hung in ``fetch_into``."""
    assert l1.reserve(key(1), ROWS, 32) is not None
    l1.commit(key(1))
    held.put(NS, key(2), payload(2), 32)
    held.held = True
    tiers = TierManager(l1, [held], read_timeout_s=0.2)
    promote, result = in_thread(lambda: tiers.promote_prefix(NS, [[key(1)], [key(2)]], [32, 32]))
    promote.join(SAFETY_S)
    if promote.is_alive():
        held.release.set()
        pytest.fail("the promotion waited for a hung tier read")
    assert result == [(1, [key(1)])] and held.entered.is_set() and not held.fetched.is_set()
    assert l1.reserved(key(2))
    tiers.unpin([key(1)])
    return tiers


def test_a_late_read_that_reports_a_failure_gives_its_slots_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmcache")
    l1, held = CpuStore(HostArena(16 * ROWS, pinned=False)), HeldTier()
    tiers = late_read(held, l1)
    one_chunk = l1.snapshot().used_bytes // 2
    held.corrupt = True  # the bytes it writes fail their check
    held.release.set()
    assert settles(lambda: not l1.reserved(key(2)))
    assert settles(lambda: "the held tier's late reads have ended" in caplog.text)
    assert key(2) not in l1 and l1.keys() == [key(1)] and l1.pinned_keys() == []
    assert l1.snapshot().used_bytes == one_chunk
    tiers.close()


def test_a_late_read_whose_l1_settling_raises_still_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing a late read's chunk raises (a bug): it is logged, and the tier is read from again."""
    caplog.set_level(logging.INFO, logger="lmcache")
    l1, held = CpuStore(HostArena(16 * ROWS, pinned=False)), HeldTier()
    tiers = late_read(held, l1)

    def commit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(l1, "commit", commit)
    held.release.set()
    assert settles(lambda: "the held tier's late reads have ended" in caplog.text)
    assert "settling" in caplog.text and "a bug" in caplog.text
    monkeypatch.undo()
    held.held = False
    tiers.promote_prefix(NS, [[key(1)], [key(2)]], [32, 32])
    assert held.fetches == 2  # not skipped as late forever
    tiers.close()


def new_threads(before: set[threading.Thread], prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name.startswith(prefix)]


def test_fetch_threads_never_hold_up_the_process_exit() -> None:
    """Python joins a ThreadPoolExecutor's threads at exit: a read hung on a dead NFS mount would hang it.
    (Promoted from this thread, not a daemon one: a thread is a daemon by default if its starter is.)"""
    assert not threading.current_thread().daemon
    before = set(threading.enumerate())
    l1, held = CpuStore(HostArena(16 * ROWS, pinned=False)), HeldTier()
    held.put(NS, key(1), payload(1), 32)
    tiers = TierManager(l1, [held], read_timeout_s=SAFETY_S)
    assert tiers.promote_prefix(NS, [[key(1)]], [32]) == (1, [key(1)]) and held.fetches == 1
    threads = new_threads(before, "lmcache-held-fetch")
    assert threads and all(t.daemon for t in threads)
    tiers.unpin([key(1)])
    tiers.close()
    for thread in threads:  # closing ends its idle threads
        thread.join(SAFETY_S)
        assert not thread.is_alive()


def test_fetch_threads_run_work_in_order_cancel_queued_work_and_refuse_work_once_shut_down() -> None:
    before = set(threading.enumerate())
    pool = FetchThreads(1, "lmcache-test-fetch")
    gate, ran = threading.Event(), []
    first = pool.submit(lambda: gate.wait(SAFETY_S))
    second = pool.submit(ran.append, 2)
    third = pool.submit(ran.append, 3)
    threads = new_threads(before, "lmcache-test-fetch")
    assert len(threads) == 1 and threads[0].daemon
    assert second.cancel() and second.cancelled()
    gate.set()
    assert first.result(SAFETY_S) is True and third.result(SAFETY_S) is None and ran == [3]
    failing = pool.submit(lambda: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(SAFETY_S)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, 4)
    for thread in threads:
        thread.join(SAFETY_S)
        assert not thread.is_alive()


def test_a_disk_read_hung_below_a_promotion_does_not_hold_up_the_process_exit(tmp_path) -> None:
    """The disk tier reads a chunk's file on threads of its own, below the promotion's fetch threads: a
    dead NFS mount hangs those. A process whose promotion gave such a read up still exits."""
    script = f"""
import sys, threading
import numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_tiers_read_bound as t
from lmcache.backoff import Backoff
from lmcache.memory import HostArena
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.tiers import TierManager

store = DiskStore({str(tmp_path)!r}, 1 << 20)
for i in (1, 2):
    store.write(t.NS, t.key(i), 32, memoryview(np.frombuffer(t.payload(i), dtype=np.uint8)))
read_into, dead = store.read_into, threading.Event()
def hung(ns, key, entry, out):  # the second chunk's read runs on the disk tier's own threads
    if key == t.key(2):
        dead.wait()
    return read_into(ns, key, entry, out)
store.read_into = hung
l1 = CpuStore(HostArena(16 * t.ROWS, pinned=False))
tiers = TierManager(l1, [DiskTier(store, backoff=Backoff(0.05, 0.2))], read_timeout_s=0.2)
print(tiers.promote_prefix(t.NS, [[t.key(1)], [t.key(2)]], [32, 32])[0], flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=SAFETY_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "0"  # the tier's read of the window was late as a whole: misses
