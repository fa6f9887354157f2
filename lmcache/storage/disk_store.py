"""L2: chunk files on a local disk, capped in bytes, evicted by policy, found again after a restart.

Files are ``<local_disk>/lmcache-kv/<namespace tag>/<first 2 hex of the chunk hash>/<key hex>.kv``
in the :mod:`lmcache.storage.chunk_format` encoding. The tier owns only its ``lmcache-kv``
subdirectory, marked by a ``.lmcache-disk-tier`` file: it is created 0700 with files 0600 (the
chunks are other tenants' KV, readable by hash), one owned by another user or unmarked is never
written (:attr:`DiskStore.problem` says why), its marker is ``flock``-ed while in use (a second
user of the directory is warned about: each counts only its own files against the cap), and the
start-up scan (:mod:`lmcache.storage.disk_scan`) looks at nothing outside it and removes only files
that are ours (``.kv`` files starting with the chunk magic or at a chunk file's path, temporaries
named as ours), so ``local_disk`` may be a shared directory. A write goes to a temporary file in the same
directory and is renamed into place (``os.replace``), so a crash leaves either the whole chunk or
no chunk under the final name (without ``disk_fsync``, possibly an empty or zero-filled one); the
next start-up scan removes such a file, and torn temporary files. Reads
go straight into the caller's buffer (``readinto`` on an unbuffered file) and are verified against
the header and the payload checksum; a file that fails (or whose read fails with EIO) is removed
and reported as a miss. A file that eviction cannot remove stays indexed and counted.

The index is rebuilt from the directory by :meth:`DiskStore.scan` (in the caller's thread, as the
constructor does by default) or :meth:`DiskStore.start_scan` (in a daemon thread, as the disk tier
does, so start-up does not wait for it). While a scan runs the store serves what it has indexed so
far (any other chunk is a miss) and writes: a chunk written, evicted or dropped meanwhile is never
indexed, counted or removed by the scan on the strength of its older look at the file, and the cap
is enforced, evicting the oldest found chunks first, once every file has been counted (until then a
write evicts only indexed chunks). :meth:`DiskStore.close` stops a running scan before its next
file and waits for it.

This class is synchronous (but for :meth:`DiskStore.start_scan`) and thread-safe. The write-behind
queue, the writer thread and the degrade-on-error policy live in :mod:`lmcache.storage.tiers`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import weakref
from pathlib import Path

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import (
    CorruptChunk,
    Namespace,
    check_header,
    check_layout,
    encode_header,
    new_checksum,
    read_header,
)
from lmcache.storage.disk_scan import (
    MARKER,
    SUFFIX,
    TMP_SUFFIX,
    DiskEntry,
    FileStamp,
    Found,
    IndexKey,
    IndexScan,
    ScanReport,
    chunk_path_of,
    claim_dir,
)
from lmcache.storage.policies import make_policy

__all__ = ["DEGRADING_ERRNOS", "MARKER", "TIER_DIR", "TMP_SUFFIX", "DiskEntry", "DiskStore", "ScanReport"]

logger = init_logger(__name__)

TIER_DIR = "lmcache-kv"
"""The subdirectory of ``local_disk`` the tier owns."""
READ_PIECE = 256 << 10  # read/write and checksum in pieces that are still in the CPU cache when hashed
WRITE_PIECE = 1 << 20

# Errors that mean the whole disk tier is unusable for now (full, read-only, no permission, bad
# device), as opposed to a problem with one file.
DEGRADING_ERRNOS = frozenset(
    e
    for e in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOTDIR,
    )
    if e is not None
)


class DiskStore:
    """Chunk files under ``root``, at most ``capacity_bytes`` in total."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        policy: str = "LRU",
        *,
        fsync: bool = False,
        verify_on_scan: bool = False,
        scan: bool = True,
    ) -> None:
        self.root = Path(root) / TIER_DIR
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.verify_on_scan = verify_on_scan
        self._policy = make_policy(policy)
        self._index: dict[IndexKey, DiskEntry] = {}
        self._writing: set[IndexKey] = set()
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(logger)
        self.used_bytes = 0
        self.evictions = 0
        self.corrupt_removed = 0
        self.last_scan = ScanReport()
        self.problem: OSError | None = None
        """Why the tier's directory is not used (another user's, not marked as ours), if it is not."""
        self._claim: weakref.finalize | None = None  # closes the marker flock-ed while the store uses it
        self.scan_done = threading.Event()
        """Set while no scan runs (cleared by :meth:`start_scan` until its scan has ended)."""
        self.scan_done.set()
        self._scan_lock = threading.Lock()  # one scan at a time; held from its start to its end
        self._scan_stop = threading.Event()  # set by close(): a running scan stops before its next file
        self._closed = False
        """Set by :meth:`close`: nothing claims the directory again (a writer the close did not wait for
        would otherwise scan and lock it after the engine closed)."""
        self._scan_thread: threading.Thread | None = None
        self._scanning: IndexScan | None = None
        # While a scan runs: the chunks whose entry or use changed since it began (written, evicted,
        # dropped, read). The scan's view of them is older: it neither adds them nor reorders them.
        self._changed: set[IndexKey] | None = None
        if scan:
            self.scan()

    def __len__(self) -> int:
        return len(self._index)

    # -- naming ---------------------------------------------------------------------------------

    def entries(self) -> list[tuple[Namespace, ChunkKey]]:
        """The (namespace, key) of every chunk indexed now."""
        with self._lock:
            return list(self._index)

    def path_for(self, ns: Namespace, key: ChunkKey) -> Path:
        return self.root / ns.tag / key.chunk_hash.hex()[:2] / f"{key.hex()}{SUFFIX}"

    # -- lookups and reads ----------------------------------------------------------------------

    def lookup(self, ns: Namespace, key: ChunkKey) -> DiskEntry | None:
        """The index entry of a chunk (no file access)."""
        return self._index.get((ns, key))

    def read_into(self, ns: Namespace, key: ChunkKey, entry: DiskEntry, out: memoryview) -> bool:
        """Fill ``out`` (exactly ``entry.payload_len`` bytes) with the chunk's verified payload.

        False on any problem; a file found corrupt or missing is dropped from the index (and removed).
        """
        try:
            with open(entry.path, "rb", buffering=0) as f:
                header = read_header(f)  # type: ignore[arg-type]
                check_header(header, key, ns, out.nbytes)
                check_layout(header)
                if os.fstat(f.fileno()).st_size != header.total_len:
                    raise CorruptChunk(
                        f"file is {os.fstat(f.fileno()).st_size} bytes, header says {header.total_len}"
                    )
                checksum = new_checksum()
                got = 0
                while got < out.nbytes:
                    n = f.readinto(out[got : got + READ_PIECE])
                    if not n:
                        raise CorruptChunk(f"truncated payload ({got} of {out.nbytes} bytes)")
                    checksum.update(out[got : got + n])
                    got += n
            if checksum.intdigest() != header.checksum:
                raise CorruptChunk("payload checksum mismatch")
        except CorruptChunk as exc:
            self.corrupt_removed += 1
            self._warn.warning(
                "corrupt", "disk tier: %s is corrupt (%s); removed, treated as a miss", entry.path, exc
            )
            self._forget(ns, key, entry, unlink=True)
            return False
        except FileNotFoundError:
            self._forget(ns, key, entry, unlink=False)
            return False
        except OSError as exc:
            self._warn.warning("read", "disk tier: cannot read %s (%s); treated as a miss", entry.path, exc)
            if exc.errno == errno.EIO:  # a bad file: dropped (and removed), so the chunk is written afresh
                self._forget(ns, key, entry, unlink=True)
            return False
        with self._lock:
            if (ns, key) in self._index:
                self._policy.touch((ns, key))
                self._mark((ns, key))
        return True

    # -- writes ---------------------------------------------------------------------------------

    def write(
        self, ns: Namespace, key: ChunkKey, num_tokens: int, payload: memoryview, checksum: int | None = None
    ) -> int | None:
        """Write one chunk atomically; returns its payload checksum if it is on disk afterwards.

        Evicts by policy to stay under the cap; None (nothing written) if the chunk cannot fit.
        ``checksum`` (if the caller already knows it) saves hashing the payload. Raises OSError for
        I/O problems (disk full, permissions, ...), after cleaning up.
        """
        ident = (ns, key)
        header_len = len(encode_header(key, ns, num_tokens, b"", checksum=0))
        size = header_len + payload.nbytes
        if size > self.capacity_bytes:
            return None
        if self._closed:
            return None
        if self._claim is None:
            self.scan()  # not claimed yet (no scan yet) or refused: never write where it is not ours
            if self.problem is not None:
                raise OSError(self.problem.errno, f"{self.root} is not used: {self.problem.strerror}")
        with self._lock:
            existing = self._index.get(ident)
            if existing is not None:
                return existing.checksum
            if ident in self._writing:
                return checksum  # another thread is writing it
            while self.used_bytes + size > self.capacity_bytes:
                victim = self._policy.victim()
                if victim is None:
                    break  # the rest of the space is held by writes in flight
                self._evict(victim)
            fits = self.used_bytes + size <= self.capacity_bytes
            if fits:
                self.used_bytes += size
                self._writing.add(ident)
        if not fits:
            return None
        path = self.path_for(ns, key)
        try:
            try:
                checksum = _write_file(
                    self.root, path, key, ns, num_tokens, payload, header_len, checksum, self.fsync
                )
            except FileNotFoundError:
                if self.root.is_dir():
                    raise
                # The tier's directory was removed under us, with every file in it: start again empty.
                self._warn.warning("root-lost", "disk tier: %s was removed; recreating it empty", self.root)
                self.clear()
                self._claim_root()
                checksum = _write_file(
                    self.root, path, key, ns, num_tokens, payload, header_len, checksum, self.fsync
                )
        except BaseException:
            with self._lock:
                self._writing.discard(ident)
                self.used_bytes -= size
            raise
        with self._lock:
            self._writing.discard(ident)
            self._index[ident] = DiskEntry(path, size, payload.nbytes, num_tokens, checksum)
            self._policy.add(ident)
            self._mark(ident)
        return checksum

    # -- removal --------------------------------------------------------------------------------

    def clear(self) -> int:
        """Forget and remove every indexed chunk; how many. (A running scan still indexes the files it
        has not reached yet.)"""
        with self._lock:
            entries = list(self._index.items())
            for ident, _ in entries:
                self._policy.discard(ident)
                self._mark(ident)
            self._index.clear()
            self.used_bytes -= sum(e.size for _, e in entries)
        for _, entry in entries:
            _unlink(entry.path)
        return len(entries)

    def _forget(self, ns: Namespace, key: ChunkKey, entry: DiskEntry, unlink: bool) -> None:
        """Drop ``entry`` (the file a read found missing or bad), unless the index has moved on to a
        newer file of the chunk meanwhile; removed under the lock, so no write of it comes between."""
        with self._lock:
            if self._index.get((ns, key)) is not entry:
                return
            del self._index[(ns, key)]
            self._policy.discard((ns, key))
            self._mark((ns, key))
            self.used_bytes -= entry.size
            if unlink:
                _unlink(entry.path)

    def _evict(self, ident: IndexKey) -> None:
        """Remove a chunk file and its entry (lock held). OSError if it cannot be removed: then it
        stays indexed and counted, as it stays on disk."""
        entry = self._index[ident]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        self._policy.discard(ident)
        del self._index[ident]
        self._mark(ident)
        self.used_bytes -= entry.size
        self.evictions += 1

    def _mark(self, ident: IndexKey) -> None:
        """Note (lock held) that ``ident``'s entry or use changed while a scan runs."""
        if self._changed is not None:
            self._changed.add(ident)

    def close(self) -> None:
        """Stop a running scan (before its next file) and wait for it; then release the directory to
        other processes (the files stay)."""
        self._closed = True
        self._scan_stop.set()
        thread = self._scan_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._release()

    def _release(self) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            claim()

    # -- start-up -------------------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """Rebuild the index from the directory in this thread (after any scan running now) and
        return what it did: valid chunk files are served again, oldest first in the eviction order;
        invalid ones (bad header, wrong name, truncated, emptied) and stale temporaries are removed;
        chunks beyond the cap are evicted, oldest first. I/O errors (missing or unreadable
        directory) leave the index as it is."""
        self._scan_lock.acquire()
        if not self._begin_scan(progress_bar=True):
            return ScanReport()
        return self._rebuild()

    def start_scan(self) -> None:
        """Claim the directory now (:attr:`problem` says if it is refused) and rebuild the index in a
        daemon thread (``lmcache-disk-scan``), as :meth:`scan` does. Meanwhile the store serves the
        chunks found so far (any other is a miss) and writes; the cap is enforced once every file is
        counted. :meth:`wait_scanned` waits for the end; :attr:`scan_progress` tells how far it got.
        Does nothing while a scan runs."""
        if not self._scan_lock.acquire(blocking=False):
            return  # a scan runs already
        if not self._begin_scan(progress_bar=False):
            return
        self._scan_thread = threading.Thread(target=self._rebuild, name="lmcache-disk-scan", daemon=True)
        self._scan_thread.start()

    def wait_scanned(self, timeout: float | None = None) -> bool:
        """Wait until no scan runs; False if one still does after ``timeout`` seconds."""
        return self.scan_done.wait(timeout)

    @property
    def scan_progress(self) -> int | None:
        """Chunks the running scan has indexed so far; None while no scan runs."""
        scanning = self._scanning
        return None if scanning is None else scanning.indexed

    def _begin_scan(self, progress_bar: bool) -> bool:
        """Claim the directory and start noting changes (``_scan_lock`` held); on a refusal, warn,
        release the lock and return False (also once closed)."""
        if self._closed:
            self._scan_lock.release()
            return False
        try:
            self._claim_root()
        except OSError as exc:
            self._scan_lock.release()
            self._warn.warning(
                "scan", "disk tier: cannot use %s (%s); starting with an empty disk index", self.root, exc
            )
            return False
        self._scan_stop.clear()
        self.scan_done.clear()
        self._scanning = IndexScan(
            self.root, self.path_for, self.verify_on_scan, self._adopt, self._remove_scanned, progress_bar
        )
        with self._lock:
            self._changed = set()
        return True

    def _rebuild(self) -> ScanReport:
        """Run the scan begun by :meth:`_begin_scan`, then order and trim the index; releases
        ``_scan_lock`` at the end."""
        started = time.monotonic()
        report = ScanReport()
        try:
            assert self._scanning is not None
            report, found = self._scanning.run(self._scan_stop)
            self._finish_scan(report, found)
        except OSError as exc:
            self._warn.warning(
                "scan", "disk tier: cannot list %s (%s); its files are not indexed", self.root, exc
            )
        finally:
            with self._lock:
                self._changed = None
            self._scanning = None
            report.seconds = time.monotonic() - started
            self.last_scan = report
            self.scan_done.set()
            self._scan_lock.release()
        if report.stopped:
            logger.info(
                "disk tier %s: start-up scan stopped by close() after %.2fs", self.root, report.seconds
            )
        elif report.files:
            logger.info(
                "disk tier %s: %d chunks (%.1f MiB) found, %d invalid files removed, %d evicted to fit "
                "max_local_disk_size (%.2fs)",
                self.root,
                report.valid,
                self.used_bytes / (1 << 20),
                report.removed,
                report.evicted,
                report.seconds,
            )
        return report

    def _adopt(self, found: Found) -> bool:
        """Index a chunk file the scan found, unless the store wrote, evicted or is writing that
        chunk since the scan began (its entry is newer, or its file is gone or being replaced)."""
        ident = found.ident
        with self._lock:
            if (
                self._changed is None
                or ident in self._changed
                or ident in self._index
                or ident in self._writing
            ):
                return False
            self._index[ident] = found.entry
            self._policy.add(ident)
            self.used_bytes += found.entry.size
        return True

    def _remove_scanned(self, path: Path, stamp: FileStamp) -> bool:
        """Remove a file the scan found invalid or stale, unless it is no longer the file the scan
        looked at (another ``stamp``: a write renamed a new file over it) or a write of ours is
        about to rename one over it. Under the lock, so no write of ours starts meanwhile."""
        with self._lock:
            if chunk_path_of(path) in {self.path_for(ns, key) for ns, key in self._writing}:
                return False
            try:
                if FileStamp.of(os.stat(path, follow_symlinks=False)) != stamp:
                    return False
            except OSError:
                return False
            _unlink(path)
        return True

    def _finish_scan(self, report: ScanReport, found: list[Found]) -> None:
        """Put the chunks the scan found (``found``, oldest first) first in the eviction order,
        except those used or rewritten since, and evict to the cap, oldest first."""
        with self._lock:
            report.valid = len(self._index)
            if report.stopped:
                return  # counted only in part: the next start trims to the cap
            assert self._changed is not None
            changed, index = self._changed, self._index
            self._policy.put_first(
                [f.ident for f in found if f.ident not in changed and index.get(f.ident) is f.entry]
            )
            try:
                while self.used_bytes > self.capacity_bytes and (victim := self._policy.victim()) is not None:
                    self._evict(victim)
                    report.evicted += 1
            except OSError as exc:  # kept and counted: writes evict again (or fail and back off)
                self._warn.warning("scan-evict", "disk tier: cannot evict from %s (%s)", self.root, exc)
            report.valid = len(self._index)

    def _claim_root(self) -> None:
        """Claim the tier's directory (:func:`~lmcache.storage.disk_scan.claim_dir`), first
        releasing an earlier claim; OSError (also kept in ``problem``) if it is refused."""
        self._release()
        try:
            fd = claim_dir(self.root)
        except OSError as exc:
            self.problem = exc
            raise
        self.problem = None
        self._claim = weakref.finalize(self, os.close, fd)


def _make_dirs(root: Path, path: Path) -> None:
    """The directories down to ``path``'s, each 0700 (below the tier's own ``root``, made when it is
    claimed)."""
    missing = []
    parent = path.parent
    while parent != root and not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)


def _write_file(
    root: Path,
    path: Path,
    key: ChunkKey,
    ns: Namespace,
    num_tokens: int,
    payload: memoryview,
    header_len: int,
    checksum: int | None,
    fsync: bool,
) -> int:
    """Write to a temporary file, then rename it into place; returns the payload checksum. Without a
    known checksum the payload goes first, hashed piece by piece while in the CPU cache, and the
    header last."""
    _make_dirs(root, path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            if checksum is None:
                hasher = new_checksum()
                for offset in range(0, payload.nbytes, WRITE_PIECE):
                    piece = payload[offset : offset + WRITE_PIECE]
                    hasher.update(piece)
                    _pwrite_all(fd, piece, header_len + offset)
                checksum = hasher.intdigest()
                header = encode_header(key, ns, num_tokens, payload, checksum=checksum)
                _pwrite_all(fd, memoryview(header), 0)
            else:
                header = encode_header(key, ns, num_tokens, payload, checksum=checksum)
                _write_all(fd, [memoryview(header), payload])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return checksum


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b for b in buffers if b.nbytes]
    while pending:
        n = os.writev(fd, pending)
        while n and pending:
            if n >= pending[0].nbytes:
                n -= pending[0].nbytes
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("disk tier: cannot remove %s: %s", path, exc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
