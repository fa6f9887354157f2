"""The disk tier's start-up work: claiming its directory and rebuilding the index from the files in it.

:class:`IndexScan` looks at every file under the tier's directory once. It never touches the index:
it hands each valid chunk file to the store (``adopt``) as soon as it is checked, so the store serves
it from then on, and hands back each invalid file of ours or stale temporary for removal
(``remove``), with the :class:`FileStamp` of the file it looked at. The store runs it in the caller's
thread (:meth:`~lmcache.storage.disk_store.DiskStore.scan`) or in a daemon thread
(:meth:`~lmcache.storage.disk_store.DiskStore.start_scan`) while it serves and writes; that is why
``adopt`` may refuse a chunk (the store wrote, evicted or is writing it since the scan began: the
scan's view of it is older) and ``remove`` may refuse a file (replaced since the scan looked at it,
or about to be replaced by a write of ours). A set ``stop`` event ends the scan before its next file.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.storage.chunk_format import (
    MAGIC,
    CorruptChunk,
    Namespace,
    check_layout,
    payload_checksum,
    read_header,
)

logger = init_logger(__name__)

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
MARKER = ".lmcache-disk-tier"
"""The file that marks the tier's directory as the tier's."""
TMP_NAME = re.compile(r"^[0-9a-f]+-w\d+r\d+\.kv\.\d+\.\d+\.tmp$")
CHUNK_NAME = re.compile(r"^([0-9a-f]{2})[0-9a-f]*-w\d+r\d+\.kv$")
"""A chunk file's name (``<key hex>.kv``); group 1 names its directory."""
TAG_NAME = re.compile(r"^[0-9a-f]{16}$")
PROGRESS_MIN_FILES = 1000
STALE_TMP_S = 60.0

IndexKey = tuple[Namespace, ChunkKey]


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
    """What a scan did: files looked at, chunks indexed when it ended, files removed, chunks evicted
    to fit the cap; ``stopped`` when ``close()`` ended it early (nothing evicted then)."""

    files: int = 0
    valid: int = 0
    removed: int = 0
    evicted: int = 0
    seconds: float = 0.0
    stopped: bool = False


@dataclass(frozen=True)
class FileStamp:
    """Which file a path named when it was looked at: a file renamed over it since has another."""

    dev: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class Found:
    """A valid chunk file: its modification time (the eviction order of found chunks), key, entry."""

    mtime: float
    ident: IndexKey
    entry: DiskEntry


class IndexScan:
    """One scan of ``root`` (the tier's directory, already claimed); ``indexed`` counts the chunks
    ``adopt`` took so far. ``progress_bar``: draw one on stderr above ``PROGRESS_MIN_FILES`` files (a
    scan in the caller's thread; one in the background would interleave with the process's logs)."""

    def __init__(
        self,
        root: Path,
        path_for: Callable[[Namespace, ChunkKey], Path],
        verify: bool,
        adopt: Callable[[Found], bool],
        remove: Callable[[Path, FileStamp], bool],
        progress_bar: bool,
    ) -> None:
        self.root = root
        self.progress_bar = progress_bar
        self.path_for = path_for
        self.verify = verify
        self.adopt = adopt
        self.remove = remove
        self.indexed = 0

    def run(self, stop: threading.Event) -> tuple[ScanReport, list[Found]]:
        """Look at every file (until ``stop`` is set); the report (without ``valid``/``evicted``,
        which the store fills in) and the chunks adopted, oldest first. OSError if the directory
        cannot be listed."""
        report = ScanReport()
        files = [p for p in walk(self.root, stop) if p.name.endswith((SUFFIX, TMP_SUFFIX))]
        report.files = len(files)
        adopted: list[Found] = []
        iterator = files
        if self.progress_bar and len(files) > PROGRESS_MIN_FILES:
            from tqdm import tqdm

            iterator = tqdm(files, desc=f"LMCache disk index {self.root}", unit="file", leave=False)
        now = time.time()
        for path in iterator:
            if stop.is_set():
                report.stopped = True
                break
            if path.name.endswith(TMP_SUFFIX):
                stale = stale_tmp(path, now)
                if stale is not None and self.remove(path, stale):
                    report.removed += 1
                continue
            item = check_file(path, self.root, self.path_for, self.verify)
            if isinstance(item, Found):
                if self.adopt(item):
                    adopted.append(item)
                    self.indexed += 1
            elif item is not None and self.remove(path, item):  # ours (it starts with the magic), invalid
                report.removed += 1
        report.stopped = report.stopped or stop.is_set()
        adopted.sort(key=lambda found: found.mtime)
        return report, adopted


def check_file(
    path: Path, root: Path, path_for: Callable[[Namespace, ChunkKey], Path], verify: bool
) -> Found | FileStamp | None:
    """A valid chunk file's :class:`Found`; else the stamp of a file of ours that is invalid (to
    remove), or None for a file that is not ours to touch (or cannot be read)."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            stamp = FileStamp.of(st)
            prefix = f.read(len(MAGIC))
            if prefix != MAGIC:
                # At one of our chunk paths it is a chunk a crash emptied or zeroed (no fsync): ours.
                # Anything else is not ours to touch.
                return stamp if at_chunk_path(path, root) else None
            f.seek(0)
            header = read_header(f)  # type: ignore[arg-type]
            ns = Namespace(header.model, header.signature)
            check_layout(header)
            if st.st_size != header.total_len or path_for(ns, header.key) != path:
                return stamp
            if verify:
                data = f.read(header.payload_len)
                if len(data) != header.payload_len or payload_checksum(data) != header.checksum:
                    return stamp
    except (CorruptChunk, ValueError):
        return stamp
    except OSError:
        return None
    entry = DiskEntry(path, header.total_len, header.payload_len, header.num_tokens, header.checksum)
    return Found(st.st_mtime, (ns, header.key), entry)


def at_chunk_path(path: Path, root: Path) -> bool:
    """Whether ``path`` is named as chunk files are (``<tag>/<xx>/<key hex>.kv`` under ``root``)."""
    name = CHUNK_NAME.match(path.name)
    tag = path.parent.parent
    return (
        name is not None
        and path.parent.name == name.group(1)
        and tag.parent == root
        and TAG_NAME.match(tag.name) is not None
    )


def chunk_path_of(path: Path) -> Path:
    """The chunk file ``path`` is, or (a temporary file) becomes when renamed into place."""
    name = path.name
    return path.with_name(name[: name.index(SUFFIX) + len(SUFFIX)]) if SUFFIX in name else path


def walk(root: Path, stop: threading.Event) -> list[Path]:
    """Every regular file under ``root`` (none once ``stop`` is set)."""
    out: list[Path] = []
    stack = [root]
    while stack and not stop.is_set():
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    out.append(Path(entry.path))
    return out


def stale_tmp(path: Path, now: float) -> FileStamp | None:
    """The stamp of a temporary file of ours no live writer will finish (its process is gone, or it
    is old); None for any other file."""
    if not TMP_NAME.match(path.name):
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return FileStamp.of(st) if _writer_gone(path.name) or now - st.st_mtime > STALE_TMP_S else None


def _writer_gone(name: str) -> bool:
    """Whether the process (and thread) named in a temporary file's name is gone."""
    parts = name.split(".")
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
    return False


def claim_dir(root: Path) -> int:
    """Create the tier's directory (0700, with its marker), or check an existing one is ours, and
    return an fd of its marker, ``flock``-ed; OSError if it belongs to another user or is not marked
    as the tier's. A lock held elsewhere (another process or store using the directory) is warned
    about: each counts only its own files against the cap."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = os.stat(root, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(errno.EACCES, "not a directory of this user", str(root))
    marker = root / MARKER
    if not marker.exists():
        if any(root.iterdir()):
            raise PermissionError(errno.EACCES, f"not marked as the disk tier's ({MARKER} missing)")
        marker.write_text("lmcache disk tier: files here are removed and evicted by lmcache\n")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)
    fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.warning(
            "disk tier: local_disk %s is in use by another LMCache engine or cache server (on this "
            "host): each counts only the files it wrote or found at its start against "
            "max_local_disk_size, so together they can hold more; give each its own local_disk",
            root.parent,
        )
    except OSError:
        pass  # a filesystem without locks: sharing it goes unnoticed
    return fd
