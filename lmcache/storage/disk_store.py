"""L2: chunk files on a local disk, capped in bytes, evicted by policy, found again after a restart.

Files are ``<local_disk>/lmcache-kv/<namespace tag>/<first 2 hex of the chunk hash>/<key hex>.kv``
in the :mod:`lmcache.storage.chunk_format` encoding. The tier owns only its ``lmcache-kv``
subdirectory, marked by a ``.lmcache-disk-tier`` file: it is created 0700 with files 0600 (the
chunks are other tenants' KV, readable by hash), one owned by another user or unmarked is never
written (:attr:`DiskStore.problem` says why), its marker is ``flock``-ed while in use (a second
user of the directory is warned about: each counts only its own files against the cap), and the
start-up scan looks at nothing outside it and removes only files that are ours (``.kv`` files
starting with the chunk magic or at a chunk file's path, temporaries named as ours), so
``local_disk`` may be a shared directory. A write goes to a temporary file in the same
directory and is renamed into place (``os.replace``), so a crash leaves either the whole chunk or
no chunk under the final name (without ``disk_fsync``, possibly an empty or zero-filled one); the
next start-up scan removes such a file, and torn temporary files. Reads
go straight into the caller's buffer (``readinto`` on an unbuffered file) and are verified against
the header and the payload checksum; a file that fails (or whose read fails with EIO) is removed
and reported as a miss. A file that eviction cannot remove stays indexed and counted.

This class is synchronous and thread-safe. The write-behind queue, the writer thread and the
degrade-on-error policy live in :mod:`lmcache.storage.tiers`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import (
    MAGIC,
    CorruptChunk,
    Namespace,
    check_header,
    check_layout,
    encode_header,
    new_checksum,
    payload_checksum,
    read_header,
)
from lmcache.storage.policies import make_policy

logger = init_logger(__name__)

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
TIER_DIR = "lmcache-kv"
"""The subdirectory of ``local_disk`` the tier owns."""
MARKER = ".lmcache-disk-tier"
"""The file that marks ``TIER_DIR`` as the tier's."""
_TMP_NAME = re.compile(r"^[0-9a-f]+-w\d+r\d+\.kv\.\d+\.\d+\.tmp$")
_CHUNK_NAME = re.compile(r"^([0-9a-f]{2})[0-9a-f]*-w\d+r\d+\.kv$")
"""A chunk file's name (``<key hex>.kv``); group 1 names its directory."""
_TAG_NAME = re.compile(r"^[0-9a-f]{16}$")
PROGRESS_MIN_FILES = 1000
STALE_TMP_S = 60.0
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

_IndexKey = tuple[Namespace, ChunkKey]


@dataclass(frozen=True)
class DiskEntry:
    """An indexed chunk file: its size on disk and what its header says."""

    path: Path
    size: int
    payload_len: int
    num_tokens: int
    checksum: int


@dataclass
class ScanReport:
    files: int = 0
    valid: int = 0
    removed: int = 0
    evicted: int = 0
    seconds: float = 0.0


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
        self._index: dict[_IndexKey, DiskEntry] = {}
        self._writing: set[_IndexKey] = set()
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(logger)
        self.used_bytes = 0
        self.evictions = 0
        self.corrupt_removed = 0
        self.last_scan = ScanReport()
        self.problem: OSError | None = None
        """Why the tier's directory is not used (another user's, not marked as ours), if it is not."""
        self._claim: weakref.finalize | None = None  # closes the marker flock-ed while the store uses it
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
        if self._claim is None:
            self.scan()  # not claimed yet (``scan=False``) or refused: never write where it is not ours
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
                checksum = self._write_file(path, key, ns, num_tokens, payload, header_len, checksum)
            except FileNotFoundError:
                if self.root.is_dir():
                    raise
                # The tier's directory was removed under us, with every file in it: start again empty.
                self._warn.warning("root-lost", "disk tier: %s was removed; recreating it empty", self.root)
                self.clear()
                self._claim_root()
                checksum = self._write_file(path, key, ns, num_tokens, payload, header_len, checksum)
        except BaseException:
            with self._lock:
                self._writing.discard(ident)
                self.used_bytes -= size
            raise
        with self._lock:
            self._writing.discard(ident)
            self._index[ident] = DiskEntry(path, size, payload.nbytes, num_tokens, checksum)
            self._policy.add(ident)
        return checksum

    def _make_dirs(self, path: Path) -> None:
        """The directories down to ``path``'s, each 0700 (below the tier's own, made by :meth:`scan`)."""
        missing = []
        parent = path.parent
        while parent != self.root and not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)

    def _write_file(
        self,
        path: Path,
        key: ChunkKey,
        ns: Namespace,
        num_tokens: int,
        payload: memoryview,
        header_len: int,
        checksum: int | None,
    ) -> int:
        """Write to a temporary file, then rename it into place. Without a known checksum the payload
        goes first, hashed piece by piece while in the CPU cache, and the header last."""
        self._make_dirs(path)
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
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        if self.fsync:
            _fsync_dir(path.parent)
        return checksum

    # -- removal --------------------------------------------------------------------------------

    def clear(self) -> int:
        with self._lock:
            entries = list(self._index.items())
            for ident, _ in entries:
                self._policy.discard(ident)
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
            self.used_bytes -= entry.size
            if unlink:
                _unlink(entry.path)

    def _evict(self, ident: _IndexKey) -> None:
        """Remove a chunk file and its entry (lock held). OSError if it cannot be removed: then it
        stays indexed and counted, as it stays on disk."""
        entry = self._index[ident]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        self._policy.discard(ident)
        del self._index[ident]
        self.used_bytes -= entry.size
        self.evictions += 1

    def close(self) -> None:
        """Release the directory to other processes (the files stay)."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim()

    # -- start-up -------------------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """Rebuild the index from the directory: valid chunk files are served again, oldest first in
        the eviction order; invalid ones (bad header, wrong name, truncated, emptied) and stale
        temporaries are removed. I/O errors (missing or unreadable directory) leave the index empty."""
        started = time.monotonic()
        report = ScanReport()
        try:
            self._claim_root()
            files = [p for p in _walk(self.root) if p.name.endswith((SUFFIX, TMP_SUFFIX))]
        except OSError as exc:
            self._warn.warning(
                "scan", "disk tier: cannot use %s (%s); starting with an empty disk index", self.root, exc
            )
            return report
        report.files = len(files)
        found: list[tuple[float, _IndexKey, DiskEntry]] = []
        iterator = files
        if len(files) > PROGRESS_MIN_FILES:
            from tqdm import tqdm

            iterator = tqdm(files, desc=f"LMCache disk index {self.root}", unit="file", leave=False)
        now = time.time()
        for path in iterator:
            if path.name.endswith(TMP_SUFFIX):
                if _TMP_NAME.match(path.name) and _stale_tmp(path, now):
                    _unlink(path)
                    report.removed += 1
                continue
            item = self._check_file(path)
            if isinstance(item, tuple):
                found.append(item)
            elif item:  # ours (it starts with the chunk magic) but invalid
                _unlink(path)
                report.removed += 1
        found.sort(key=lambda t: t[0])
        with self._lock:
            for _, ident, entry in found:
                if ident in self._index:
                    continue
                self._index[ident] = entry
                self._policy.add(ident)
                self.used_bytes += entry.size
            try:
                while self.used_bytes > self.capacity_bytes and (victim := self._policy.victim()) is not None:
                    self._evict(victim)
                    report.evicted += 1
            except OSError as exc:  # kept and counted: writes evict again (or fail and back off)
                self._warn.warning("scan-evict", "disk tier: cannot evict from %s (%s)", self.root, exc)
        report.valid = len(self._index)
        report.seconds = time.monotonic() - started
        self.last_scan = report
        if report.files:
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

    def _claim_root(self) -> None:
        """Create the tier's directory (0700, with its marker), or check an existing one is ours, and
        lock its marker; OSError (also kept in ``problem``) if it belongs to another user or is not
        marked as the tier's. A lock held elsewhere (another process or store using the directory)
        is warned about: each counts only its own files against the cap."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.root.mkdir(mode=0o700)
            st = os.stat(self.root, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise PermissionError(errno.EACCES, "not a directory of this user", str(self.root))
            marker = self.root / MARKER
            if not marker.exists():
                if any(self.root.iterdir()):
                    raise PermissionError(errno.EACCES, f"not marked as the disk tier's ({MARKER} missing)")
                marker.write_text("lmcache disk tier: files here are removed and evicted by lmcache\n")
            if st.st_mode & 0o077:
                os.chmod(self.root, 0o700)
            fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            self.problem = exc
            raise
        self.problem = None
        self.close()  # a lock of an earlier claim
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning(
                "disk tier: local_disk %s is in use by another LMCache engine or cache server (on this "
                "host): each counts only the files it wrote or found at its start against "
                "max_local_disk_size, so together they can hold more; give each its own local_disk",
                self.root.parent,
            )
        except OSError:
            pass  # a filesystem without locks: sharing it goes unnoticed
        self._claim = weakref.finalize(self, os.close, fd)

    def _check_file(self, path: Path) -> tuple[float, _IndexKey, DiskEntry] | bool:
        """The index entry of a valid chunk file; else whether the file is ours (to remove)."""
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                prefix = f.read(len(MAGIC))
                if prefix != MAGIC:
                    # At one of our chunk paths it is a chunk a crash emptied or zeroed (no fsync):
                    # ours. Anything else is not ours to touch.
                    return self._at_chunk_path(path)
                f.seek(0)
                header = read_header(f)  # type: ignore[arg-type]
                ns = Namespace(header.model, header.signature)
                check_layout(header)
                if st.st_size != header.total_len or self.path_for(ns, header.key) != path:
                    return True
                if self.verify_on_scan:
                    data = f.read(header.payload_len)
                    if len(data) != header.payload_len or payload_checksum(data) != header.checksum:
                        return True
        except (CorruptChunk, ValueError):
            return True
        except OSError:
            return False
        entry = DiskEntry(path, header.total_len, header.payload_len, header.num_tokens, header.checksum)
        return st.st_mtime, (ns, header.key), entry

    def _at_chunk_path(self, path: Path) -> bool:
        """Whether ``path`` is named as :meth:`path_for` names chunk files (``<tag>/<xx>/<key hex>.kv``
        under the tier's directory)."""
        name = _CHUNK_NAME.match(path.name)
        tag = path.parent.parent
        return (
            name is not None
            and path.parent.name == name.group(1)
            and tag.parent == self.root
            and _TAG_NAME.match(tag.name) is not None
        )


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    out.append(Path(entry.path))
    return out


def _stale_tmp(path: Path, now: float) -> bool:
    """A temporary file no live writer will finish: its process is gone, or it is old."""
    parts = path.name.split(".")
    try:
        pid = int(parts[-3])
        if pid != os.getpid():
            os.kill(pid, 0)
        elif int(parts[-2]) not in {t.ident for t in threading.enumerate()}:
            return True  # our pid but none of our threads: an earlier process's (a container's pid 1)
    except (ValueError, IndexError, OverflowError, ProcessLookupError):
        return True
    except PermissionError:
        pass
    try:
        return now - path.stat().st_mtime > STALE_TMP_S
    except OSError:
        return False


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
