"""The tiers behind L1: write-behind to disk (L2) and Redis/Valkey (L3), lookups down the tiers and
promotion of their hits into L1.

Threads and who does what:

- the engine's caller (store): commits chunks into L1 and calls :meth:`TierManager.write_behind`,
  which pins each chunk (its L1 slot cannot be reused) and appends it to a bounded per-tier queue.
  Nothing else happens on that path; a full queue drops the write with a rate-limited warning.
- one writer thread per lower tier drains its queue: it waits for the chunk's filling copy on the
  host (``CachedChunk.wait_ready_on_host``, the CUDA event of the store), writes the L1 bytes
  (disk: one file per chunk, atomically; Redis: pipelined SETs of up to ``remote_write_batch``
  chunks), then unpins the chunk.
- the engine's caller (lookup, or retrieve after an L1 miss): :meth:`TierManager.promote_prefix`
  finds each chunk in L1, the disk index or Redis (one pipelined EXISTS for all of them), then moves
  the available prefix into L1: L1 slots are reserved in the caller's thread, disk files are read
  straight into them by a small thread pool (``readinto`` + checksum, both without the GIL), Redis
  values are fetched by batched MGET and copied in once. Promoted chunks are committed and pinned
  atomically, so they stay put until the engine has taken its own pins. Promotion is synchronous
  in this version, also with ``enable_async_loading``.

Failures degrade, never raise: a disk that is full, read-only or failing, or a Redis that is down or
slow, is skipped (with one rate-limited warning) and retried after a backoff that doubles up to
``tier_retry_max_s``. Nothing unverified is ever committed to L1.

``close()`` (and an ``atexit`` hook that holds the manager only weakly) waits up to
``blocking_timeout_secs`` for the queues to drain, so a clean shutdown loses no queued write.

Knobs (validated settings of :class:`LMCacheEngineConfig`, see docs/configuration.md):
``tier_write_queue_bytes`` (per tier; default a quarter of L1), ``tier_read_threads``,
``remote_fetch_batch``, ``remote_write_batch``, ``tier_retry_initial_s``, ``tier_retry_max_s``,
``disk_fsync``, ``disk_verify_on_startup``.

A disk directory that cannot be written is found at start (a probe file): the disk tier starts
down, ``/health`` says so, and L1 serves as usual.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage import remote_store
from lmcache.storage.chunk_format import ChunkHeader, Namespace, encode_header, payload_checksum
from lmcache.storage.cpu_store import CachedChunk, CpuStore
from lmcache.storage.disk_store import DEGRADING_ERRNOS, DiskEntry, DiskStore
from lmcache.storage.remote_store import RemoteStore, describe_url

logger = init_logger(__name__)

__all__ = ["TierManager", "TierStats"]


def _unwritable(root: Path) -> OSError | None:
    """Why no file can be created in ``root`` (created if missing), or None when one can."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".lmcache-write-probe-", dir=root)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc
    return None


@dataclass
class TierStats:
    disk_writes: int = 0
    disk_write_bytes: int = 0
    disk_hits: int = 0
    disk_read_bytes: int = 0
    remote_writes: int = 0
    remote_write_bytes: int = 0
    remote_hits: int = 0
    remote_read_bytes: int = 0
    dropped_writes: int = 0
    corrupt_chunks: int = 0
    promotion_failures: int = 0


@dataclass(eq=False)
class _WriteItem:
    ns: Namespace
    key: ChunkKey
    chunk: CachedChunk


def payload_view(chunk: CachedChunk) -> memoryview:
    """The chunk's L1 bytes as a flat memoryview (no copy)."""
    return memoryview(chunk.buffer.data[: chunk.nbytes].numpy())


class _WriteQueue:
    """A bounded FIFO of pinned chunks for one tier, drained in batches by one daemon thread."""

    def __init__(
        self,
        name: str,
        l1: CpuStore,
        handler: Callable[[list[_WriteItem]], None],
        max_bytes: int,
        batch_items: int,
    ) -> None:
        self.name = name
        self.l1 = l1
        self.handler = handler
        self.max_bytes = max_bytes
        self.batch_items = max(1, batch_items)
        self._items: deque[_WriteItem] = deque()
        self._cond = threading.Condition()
        self.queued_bytes = 0
        self.pending = 0  # queued + being written
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"lmcache-{name}-writer", daemon=True)
        self._thread.start()

    def offer(self, item: _WriteItem) -> bool:
        with self._cond:
            if self._stopping:
                return False
            if self._items and self.queued_bytes + item.chunk.nbytes > self.max_bytes:
                return False
            self._items.append(item)
            self.queued_bytes += item.chunk.nbytes
            self.pending += 1
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    return
                batch = [self._items.popleft() for _ in range(min(self.batch_items, len(self._items)))]
                self.queued_bytes -= sum(item.chunk.nbytes for item in batch)
            try:
                self.handler(batch)
            except BaseException:  # noqa: BLE001 - the writer must survive anything
                logger.exception("%s writer: unexpected error; %d chunks not written", self.name, len(batch))
            finally:
                for item in batch:
                    self.l1.unpin(item.key)
                with self._cond:
                    self.pending -= len(batch)
                    self._cond.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, deadline: float) -> int:
        """Stop the thread once the queue is empty (or at ``deadline``); returns how many were dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._items)
            self._items.clear()
            self.queued_bytes = 0
            self.pending -= len(left)
        for item in left:
            self.l1.unpin(item.key)
        return len(left)


_IN_L1 = "l1"
_REMOTE = "remote"


@dataclass(eq=False)
class _Cell:
    """One key being promoted: where it comes from, the L1 slot reserved for it, whether it is filled."""

    key: ChunkKey
    source: Any
    chunk: CachedChunk | None = None
    ok: bool = False


_LIVE: weakref.WeakSet[TierManager] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for manager in list(_LIVE):
        try:
            manager.close()
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            logger.exception("flushing the cache tiers at exit failed")


atexit.register(_close_all_at_exit)


class TierManager:
    """L2 (disk) and L3 (remote) behind an L1 :class:`CpuStore`."""

    def __init__(
        self,
        l1: CpuStore,
        *,
        disk: DiskStore | None = None,
        remote: RemoteStore | None = None,
        timeout_s: float = 10.0,
        queue_bytes: int | None = None,
        read_threads: int = 4,
        fetch_batch: int = 8,
        write_batch: int = 8,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.l1 = l1
        self.disk = disk
        self.remote = remote
        self.timeout_s = timeout_s
        self.fetch_batch = max(1, fetch_batch)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.stats = TierStats()
        self._stats_lock = threading.Lock()
        # L1 chunk -> payload checksum, while both writers hold it (a chunk's bytes never change
        # while it is committed; a reused slot belongs to a new CachedChunk object).
        self._checksums: weakref.WeakKeyDictionary[CachedChunk, int] = weakref.WeakKeyDictionary()
        self._warn = RateLimitedLog(logger)
        self._disk_down_until = 0.0
        self._disk_backoff = 0.0
        self._closed = False
        self._close_lock = threading.Lock()
        if queue_bytes is None:
            queue_bytes = max(l1.arena.capacity_bytes // 4, 1)
        self._disk_q = _WriteQueue("disk", l1, self._write_disk, queue_bytes, 1) if disk is not None else None
        self._remote_q = (
            _WriteQueue("remote", l1, self._write_remote, queue_bytes, write_batch)
            if remote is not None
            else None
        )
        self._readers = ThreadPoolExecutor(max(1, read_threads), thread_name_prefix="lmcache-tier-read")
        _LIVE.add(self)
        if disk is not None:
            problem = _unwritable(disk.root)
            if problem is not None:
                self._disk_failed(problem)

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig, l1: CpuStore) -> TierManager | None:
        """The tiers ``config`` asks for (``local_disk``, ``remote_url``), or None when there are none."""
        if config.local_disk is None and config.remote_url is None:
            return None
        disk = remote = None
        if config.local_disk is not None:
            disk = DiskStore(
                config.local_disk,
                config.max_local_disk_bytes,
                config.cache_policy,
                fsync=config.disk_fsync,
                verify_on_scan=config.disk_verify_on_startup,
            )
        if config.remote_url is not None:
            remote = RemoteStore(
                config.remote_url,
                timeout_s=config.blocking_timeout_secs,
                lookup_timeout_s=config.lookup_timeout_ms / 1000.0,
                backoff_initial_s=config.tier_retry_initial_s,
                backoff_max_s=config.tier_retry_max_s,
            )
            logger.info("remote tier: %s", describe_url(config.remote_url))
        return cls(
            l1,
            disk=disk,
            remote=remote,
            timeout_s=config.blocking_timeout_secs,
            queue_bytes=config.tier_write_queue_bytes,
            read_threads=config.tier_read_threads,
            fetch_batch=config.remote_fetch_batch,
            write_batch=config.remote_write_batch,
            retry_initial_s=config.tier_retry_initial_s,
            retry_max_s=config.tier_retry_max_s,
        )

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- write-behind ---------------------------------------------------------------------------

    def write_behind(self, ns: Namespace, keys: Sequence[ChunkKey], *, remote: bool = True) -> None:
        """Queue newly committed L1 chunks for the lower tiers (never blocks on I/O)."""
        if self._closed:
            return
        for key in keys:
            if self._disk_q is not None and self.disk is not None and self.disk.lookup(ns, key) is None:
                if time.monotonic() < self._disk_down_until:
                    self._count(dropped_writes=1)
                else:
                    self._offer(self._disk_q, ns, key)
            if remote and self._remote_q is not None and self.remote is not None:
                if not self.remote.available():
                    self._count(dropped_writes=1)
                else:
                    self._offer(self._remote_q, ns, key)

    def _offer(self, queue: _WriteQueue, ns: Namespace, key: ChunkKey) -> None:
        if not self.l1.pin(key):
            return
        chunk = self.l1.get(key)
        if chunk is None or not queue.offer(_WriteItem(ns, key, chunk)):
            self.l1.unpin(key)
            self._count(dropped_writes=1)
            self._warn.warning(
                f"{queue.name}-full",
                "%s tier write-behind queue is full (%.1f MiB queued); dropping writes of new chunks "
                "(they stay in L1). The %s tier is slower than the store rate; raise the "
                "tier_write_queue_bytes setting if this persists.",
                queue.name,
                queue.queued_bytes / (1 << 20),
                queue.name,
            )

    def _write_disk(self, items: list[_WriteItem]) -> None:
        assert self.disk is not None
        for item in items:
            if time.monotonic() < self._disk_down_until:
                self._count(dropped_writes=1)
                continue
            try:
                item.chunk.wait_ready_on_host()
                payload = payload_view(item.chunk)
                known = self._checksum_of(item.chunk)
                checksum = self.disk.write(item.ns, item.key, item.chunk.num_tokens, payload, known)
            except OSError as exc:
                self._count(dropped_writes=1)
                if exc.errno in DEGRADING_ERRNOS:
                    self._disk_failed(exc)
                else:
                    self._warn.warning("disk-write", "disk tier: write of a chunk failed (%s)", exc)
                continue
            if checksum is not None:
                self._remember_checksum(item.chunk, checksum)
                self._count(disk_writes=1, disk_write_bytes=payload.nbytes)
                self._disk_ok()
            else:
                self._count(dropped_writes=1)

    def _checksum_of(self, chunk: CachedChunk) -> int | None:
        """The payload checksum one writer already computed for this L1 chunk (each is hashed once)."""
        with self._stats_lock:
            return self._checksums.get(chunk)

    def _remember_checksum(self, chunk: CachedChunk, checksum: int) -> None:
        with self._stats_lock:
            self._checksums[chunk] = checksum

    def _disk_failed(self, exc: OSError) -> None:
        self._disk_backoff = min(self.retry_max_s, max(self.retry_initial_s, self._disk_backoff * 2))
        self._disk_down_until = time.monotonic() + self._disk_backoff
        assert self.disk is not None
        self._warn.warning(
            "disk-down",
            "disk tier %s cannot be written (%s); continuing with L1 only for now, retrying in %.1fs "
            "(with backoff)",
            self.disk.root,
            exc,
            self._disk_backoff,
        )

    def _disk_ok(self) -> None:
        if self._disk_backoff:
            self._disk_backoff = 0.0
            self._disk_down_until = 0.0
            assert self.disk is not None
            logger.info("disk tier %s is writable again", self.disk.root)

    def _write_remote(self, items: list[_WriteItem]) -> None:
        assert self.remote is not None
        batch = []
        for item in items:
            item.chunk.wait_ready_on_host()
            payload = payload_view(item.chunk)
            checksum = self._checksum_of(item.chunk)
            if checksum is None:
                checksum = payload_checksum(payload)
                self._remember_checksum(item.chunk, checksum)
            header = encode_header(item.key, item.ns, item.chunk.num_tokens, payload, checksum)
            batch.append((item.ns, item.key, (header, payload)))
        written = self.remote.put_many(batch)
        if written is None:
            self._count(dropped_writes=len(items))
        else:
            self._count(remote_writes=written, remote_write_bytes=sum(i.chunk.nbytes for i in items))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has been written (or dropped); False on timeout."""
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        ok = True
        for queue in (self._disk_q, self._remote_q):
            if queue is not None:
                ok = queue.wait_idle(deadline) and ok
        return ok

    def close(self, timeout: float | None = None) -> bool:
        """Flush the queues (bounded by ``timeout``, default ``blocking_timeout_secs``), stop the threads.

        Idempotent. Returns False if writes were still queued at the deadline (they are dropped).
        """
        with self._close_lock:
            if self._closed:
                return True
            self._closed = True
        _LIVE.discard(self)
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        dropped = 0
        for queue in (self._disk_q, self._remote_q):
            if queue is not None:
                queue.wait_idle(deadline)
        for queue in (self._disk_q, self._remote_q):
            if queue is not None:
                dropped += queue.stop(deadline)
        if dropped:
            self._count(dropped_writes=dropped)
            logger.warning(
                "closing the cache tiers: %d queued writes not flushed before the deadline", dropped
            )
        self._readers.shutdown(wait=False)
        if self.remote is not None:
            self.remote.close()
        return dropped == 0

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lookups and promotion ------------------------------------------------------------------

    def present(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which chunks some tier holds (L1, disk index, then one remote round trip for the rest)."""
        found = [
            key in self.l1 or (self.disk is not None and self.disk.lookup(ns, key) is not None)
            for key in keys
        ]
        missing = [i for i, f in enumerate(found) if not f]
        if missing and self.remote is not None and not self._closed:
            flags = self.remote.exists_many(ns, [keys[i] for i in missing])
            for i, flag in zip(missing, flags or [False] * len(missing), strict=True):
                found[i] = flag
        return found

    def promote_prefix(
        self, ns: Namespace, positions: Sequence[Sequence[ChunkKey]]
    ) -> tuple[int, list[ChunkKey]]:
        """Bring the longest prefix of ``positions`` (each a list of keys that must all be present, e.g.
        one per rank) into L1. Returns how many positions are now in L1 and the keys this call pinned
        there (the caller unpins them with :meth:`unpin` once it holds its own pins)."""
        if not positions or self._closed:
            return 0, []
        where: list[list[Any]] = []
        unknown: list[tuple[int, int]] = []
        for p, keys in enumerate(positions):
            row: list[Any] = []
            for i, key in enumerate(keys):
                entry = None
                if key in self.l1:
                    row.append(_IN_L1)
                    continue
                if self.disk is not None:
                    entry = self.disk.lookup(ns, key)
                row.append(entry)
                if entry is None:
                    unknown.append((p, i))
            where.append(row)
        if unknown and self.remote is not None:
            flags = self.remote.exists_many(ns, [positions[p][i] for p, i in unknown])
            for (p, i), flag in zip(unknown, flags or [False] * len(unknown), strict=True):
                if flag:
                    where[p][i] = _REMOTE
        prefix = next((p for p, row in enumerate(where) if any(w is None for w in row)), len(where))
        pins: list[ChunkKey] = []
        done = 0
        while done < prefix:
            stop = min(prefix, done + self.fetch_batch)
            ok = self._promote_window(ns, positions, where, done, stop, pins)
            done += ok
            if done < stop:
                self._count(promotion_failures=1)
                break
        return done, pins

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self.l1.unpin(key)

    def _promote_window(
        self,
        ns: Namespace,
        positions: Sequence[Sequence[ChunkKey]],
        where: list[list[Any]],
        start: int,
        stop: int,
        pins: list[ChunkKey],
    ) -> int:
        """Promote positions ``[start, stop)``; returns how many leading positions succeeded."""
        l1 = self.l1
        # 0. Pin what L1 already has in the window first, so reserving slots below cannot evict it.
        #    A chunk evicted since ``where`` was computed may still be on disk.
        prepinned: set[ChunkKey] = set()
        for p in range(start, stop):
            for i, key in enumerate(positions[p]):
                if where[p][i] is _IN_L1:
                    if l1.pin(key):
                        prepinned.add(key)
                    else:
                        where[p][i] = self.disk.lookup(ns, key) if self.disk is not None else None
        # 1. In order: take those pins, reserve slots for disk chunks, up to the first failure.
        #    Remote chunks get their slot when their header has arrived and checked out.
        rows: list[list[_Cell]] = []
        for p in range(start, stop):
            row: list[_Cell] = []
            ok = True
            for i, key in enumerate(positions[p]):
                cell = _Cell(key, where[p][i])
                if cell.source is None:
                    ok = False
                elif cell.source is _IN_L1:
                    ok = key in prepinned
                    prepinned.discard(key)
                elif isinstance(cell.source, DiskEntry):
                    cell.chunk = l1.reserve(key, cell.source.payload_len, cell.source.num_tokens)
                    if cell.chunk is None:  # there already (a concurrent promotion), or L1 full of pins
                        cell.source = _IN_L1
                        ok = l1.pin(key)
                if not ok:
                    break
                row.append(cell)
            if not ok:
                self._release_row(row)
                break
            rows.append(row)
        for key in prepinned:  # pinned in step 0 but past the first failure
            l1.unpin(key)

        # 2. Disk reads run on the reader threads while remote values stream into their slots here.
        disk_cells = [c for row in rows for c in row if isinstance(c.source, DiskEntry)]
        futures = [self._readers.submit(self._fill_disk, ns, c) for c in disk_cells[1:]]
        remote_cells = [c for row in rows for c in row if c.source is _REMOTE]
        if remote_cells:
            self._fetch_remote(ns, remote_cells)
        if disk_cells:
            self._fill_disk(ns, disk_cells[0])
        for future in futures:
            future.result()

        # 3. Publish in order: commit + pin as one step; the leading complete positions are the result.
        leading = 0
        broken = False
        disk_hits = remote_hits = disk_bytes = remote_bytes = 0
        promoted_remote: list[ChunkKey] = []
        for row in rows:
            keep = not broken and all(c.source is _IN_L1 or c.ok for c in row)
            for c in row:
                if c.source is _IN_L1:
                    if keep:
                        pins.append(c.key)
                    else:
                        l1.unpin(c.key)
                    continue
                if c.chunk is None:
                    continue
                if not c.ok:
                    l1.abort(c.key)
                    continue
                with l1._lock:  # commit and pin as one step, so nothing evicts it in between
                    l1.commit(c.key, None)
                    if keep:
                        l1.pin(c.key)
                if keep:
                    pins.append(c.key)
                if c.source is _REMOTE:
                    remote_hits += 1
                    remote_bytes += c.chunk.nbytes
                    promoted_remote.append(c.key)
                else:
                    disk_hits += 1
                    disk_bytes += c.chunk.nbytes
            if keep:
                leading += 1
            else:
                broken = True
        self._count(
            disk_hits=disk_hits,
            disk_read_bytes=disk_bytes,
            remote_hits=remote_hits,
            remote_read_bytes=remote_bytes,
        )
        if promoted_remote and self.disk is not None:
            self.write_behind(ns, promoted_remote, remote=False)
        return leading

    def _fetch_remote(self, ns: Namespace, cells: list[_Cell]) -> None:
        """One MGET for ``cells``; each value goes straight into an L1 slot reserved on arrival."""
        assert self.remote is not None

        def sink(index: int, header: ChunkHeader) -> memoryview | None:
            cell = cells[index]
            cell.chunk = self.l1.reserve(cell.key, header.payload_len, header.num_tokens)
            return None if cell.chunk is None else payload_view(cell.chunk)

        statuses = self.remote.fetch_into(ns, [c.key for c in cells], sink)
        if statuses is None:  # remote failed (it warned): whatever was reserved is dropped
            return
        corrupt = []
        for cell, status in zip(cells, statuses, strict=True):
            cell.ok = status == remote_store.OK
            if status == remote_store.CORRUPT:
                corrupt.append(cell.key)
            elif status == remote_store.SKIPPED and cell.chunk is None and self.l1.pin(cell.key):
                cell.source = _IN_L1  # a concurrent promotion brought it in meanwhile
        if corrupt:
            self._count(corrupt_chunks=len(corrupt))
            self._warn.warning(
                "remote-corrupt",
                "remote tier: %d corrupt chunk values (e.g. %s) treated as misses and deleted",
                len(corrupt),
                RemoteStore.key_name(ns, corrupt[0]).decode(errors="replace"),
            )
            self.remote.delete_many(ns, corrupt)

    def _release_row(self, row: list[_Cell]) -> None:
        for cell in row:
            if cell.source is _IN_L1:
                self.l1.unpin(cell.key)
            elif cell.chunk is not None:
                self.l1.abort(cell.key)

    def _fill_disk(self, ns: Namespace, cell: _Cell) -> None:
        assert self.disk is not None and cell.chunk is not None
        cell.ok = self.disk.read_into(ns, cell.key, cell.source, payload_view(cell.chunk))
