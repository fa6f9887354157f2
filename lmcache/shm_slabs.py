"""L1 slabs in POSIX shared memory, so worker processes copy into and out of the cache server's L1.

Server side, :class:`ShmSlabSource` is a :class:`~lmcache.memory.SlabSource` whose slabs are
regions ``/dev/shm/lmcache-l1-<pid>-<random>-<id>``, created ``O_CREAT | O_EXCL`` with mode 0600
(owned by the server's user), mapped ``MAP_SHARED``. They are page-locked in the server only when
the source is ``pinned`` (the server copies into CUDA pools itself); otherwise no CUDA call is made.
Every region's name is unlinked when its slab is freed, when the source closes and at exit; a
source that starts unlinks the regions of this user left by a server that is no longer alive.

Worker side, :func:`map_slab` maps a region the server described (:class:`ShmSlabInfo`) after
checking it is a regular file of this process's uid, mode 0600 and exactly the size announced.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmcache.logging import init_logger
from lmcache.memory import Slab, SlabSource, rows_view
from lmcache.page_locking import Abandon, pin_in_place, populate

logger = init_logger(__name__)

SHM_DIR = "/dev/shm"
SLAB_PREFIX = "lmcache-l1"
_NAME = re.compile(rf"^{SLAB_PREFIX}-(\d+)-[0-9a-f]+-\d+$")


class ShmSlabError(ValueError):
    """A shared-memory slab cannot be created or mapped; the message says what to do."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_fd(fd: int, nbytes: int, *, writable: bool = True) -> torch.Tensor:
    """The first ``nbytes`` of the file ``fd`` mapped shared, as a uint8 tensor, unmapped once its
    storage (which every view keeps) goes. ``fd`` stays the caller's, and the mapping holds no descriptor
    of its own (Python's ``mmap`` keeps a duplicate per mapping: thousands for a large L1, in the server
    and in every worker). OSError if the kernel refuses."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _libc.mmap(None, nbytes, prot, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buffer = (ctypes.c_ubyte * nbytes).from_address(address)
    weakref.finalize(buffer, _libc.munmap, address, nbytes).atexit = False
    return torch.frombuffer(buffer, dtype=torch.uint8)


@dataclass(frozen=True)
class ShmSlabInfo:
    """What a worker needs to map a slab: its id, region name (in ``/dev/shm``) and size; for a slab
    passed by descriptor instead (:mod:`lmcache.fd_slabs`), its ``kind`` and the server's ``channel``
    socket to ask for it on (no name)."""

    id: int
    name: str
    nbytes: int
    kind: str = "shm"
    channel: str = ""


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid runs (this user's or another's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def creator_alive(name: str) -> bool:
    """Whether the process that created the region ``name`` (its pid is in the name) still runs."""
    return creator_check(name)()


def creator_check(name: str) -> Callable[[], bool]:
    """:func:`creator_alive` for ``name``, its name parsed once: asked on every claimed lookup."""
    match = _NAME.match(name)
    if match is None:
        return lambda: False
    return functools.partial(pid_alive, int(match.group(1)))


def cleanup_stale(shm_dir: str = SHM_DIR) -> int:
    """Unlink this user's L1 regions whose creating process is gone (a crashed server); returns how
    many. Regions of live processes and of other users are left alone."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    uid = os.geteuid()
    for name in names:
        match = _NAME.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d stale L1 shared-memory region(s) of a server that is gone", removed)
    return removed


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class ShmSlabSource(SlabSource):
    """Slabs in POSIX shared memory (see the module docstring); ``pinned`` page-locks them here."""

    memory = "shm"

    def __init__(self, pinned: bool = False, *, shm_dir: str = SHM_DIR) -> None:
        super().__init__(pinned)
        self.shm_dir = shm_dir
        self.stale_removed = cleanup_stale(shm_dir)
        self._stem = f"{SLAB_PREFIX}-{os.getpid()}-{secrets.token_hex(6)}"
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: Abandon | None = None
    ) -> Slab:
        """A new region of ``nbytes`` bytes, mapped; page-locked if the source is ``pinned`` (by
        registration whatever ``beside_transfers`` and ``abandon`` say: other processes map the region,
        and the driver cannot make it)."""
        if self._closed:
            raise ShmSlabError("this L1's shared memory was closed (server shutting down)")
        slab_id = self.new_id()
        name = f"{self._stem}-{slab_id}"
        path = os.path.join(self.shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ShmSlabError(
                f"cannot create the L1 shared-memory region {path}: {e.strerror}; check that {self.shm_dir} "
                "is a writable tmpfs with room for the L1 size"
            ) from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            # Allocated, not only sized: a tmpfs without room for the region fails here, cleanly,
            # instead of killing whichever process first touches a page it cannot back (SIGBUS).
            os.posix_fallocate(fd, 0, nbytes)
            tensor = map_fd(fd, nbytes)
        except OSError as e:
            _unlink(path)
            hint = (
                f"; {self.shm_dir} has no room for it: enlarge it (docker: --shm-size), start the server "
                f"with --l1-memory fd (L1 outside {self.shm_dir}) or lower --l1-size-gb"
                if e.errno in (errno.ENOSPC, errno.ENOMEM)
                else ""
            )
            raise ShmSlabError(
                f"cannot allocate the {nbytes >> 20} MiB L1 region {path}: {e.strerror}{hint}"
            ) from None
        finally:
            os.close(fd)
        if self.pinned and not pin_in_place(tensor):
            logger.warning("could not page-lock the L1 region %s; copies from it will be slower", name)
        slab = Slab(slab_id, tensor, name)
        with self._lock:
            self._paths[slab_id] = path
        weakref.finalize(slab, self._forget, slab_id)
        return self._track(slab)

    def _forget(self, slab_id: int) -> None:
        """The slab was freed: its name goes (workers' mappings stay valid until they drop them)."""
        with self._lock:
            path = self._paths.pop(slab_id, None)
        if path is not None:
            _unlink(path)

    def describe(self, slab_id: int) -> ShmSlabInfo | None:
        """How a worker maps the live slab ``slab_id``; None once it was freed."""
        slab = self.slab(slab_id)
        if slab is None:
            return None
        return ShmSlabInfo(slab.id, slab.name, slab.nbytes)

    def region_paths(self) -> list[str]:
        """Paths of the regions this source created that still exist."""
        with self._lock:
            return list(self._paths.values())

    def close(self) -> None:
        """Unlink every region (idempotent). Mappings already made, here and in workers, stay valid."""
        with self._lock:
            self._closed = True
            paths, self._paths = list(self._paths.values()), {}
        for path in paths:
            _unlink(path)
        atexit.unregister(self.close)


@dataclass(eq=False)
class MappedSlab:
    """A worker's mapping of one server slab; ``tensor`` is its bytes (uint8)."""

    info: ShmSlabInfo
    tensor: torch.Tensor
    pinned: bool
    _rows: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = field(default_factory=dict, repr=False)
    _slots: dict[tuple[torch.dtype, tuple[int, ...], int, int], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    def rows(self, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
        """The slab as whole rows (see :func:`lmcache.memory.rows_view`), built once per layout: a
        slot's view is then one slice of it."""
        cached = self._rows.get((dtype, row_shape))
        if cached is None:
            cached = self._rows[dtype, row_shape] = rows_view(self.tensor, dtype, row_shape)
        return cached

    def slot_rows(
        self, dtype: torch.dtype, row_shape: tuple[int, ...], first: int, count: int
    ) -> torch.Tensor:
        """Rows ``[first, first + count)`` of :meth:`rows`, kept: the server reuses its slots with one
        layout, so each slot's view is built once (at most one per slot and size)."""
        key = (dtype, row_shape, first, count)
        view = self._slots.get(key)
        if view is None:
            view = self._slots[key] = self.rows(dtype, row_shape)[first : first + count]
        return view


def map_slab(info: ShmSlabInfo, *, pin: bool, shm_dir: str = SHM_DIR) -> MappedSlab:
    """Map the server's slab ``info`` names, after checking it is a regular file owned by this process's
    uid, mode 0600 and of ``info.nbytes`` bytes; page-lock it if ``pin`` (a CUDA pool copies with it)."""
    fd = _open_checked(info, writable=True, shm_dir=shm_dir)
    try:
        tensor = map_fd(fd, info.nbytes)
    except OSError as e:
        raise ShmSlabError(f"cannot map the server's L1 region {info.name}: {e.strerror}") from None
    finally:
        os.close(fd)
    if pin:
        # This process's page tables filled first, outside the driver's lock (threads mapping other
        # slabs do the same at once): page-locking then only pins.
        populate(tensor.data_ptr(), tensor.numel())
    pinned = pin and pin_in_place(tensor, fault_in=False)
    return MappedSlab(info, tensor, pinned)


def open_region(info: ShmSlabInfo, *, writable: bool, shm_dir: str = SHM_DIR) -> mmap.mmap:
    """Map a region a server created (see :func:`map_slab` for the checks), read-only unless ``writable``."""
    fd = _open_checked(info, writable=writable, shm_dir=shm_dir)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, info.nbytes, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)


def _open_checked(info: ShmSlabInfo, *, writable: bool, shm_dir: str) -> int:
    """A descriptor of the region ``info`` names (the caller's to close), after the checks of
    :func:`map_slab`; ShmSlabError if one fails."""
    if not _NAME.match(info.name):
        raise ShmSlabError(f"{info.name!r} is not the name of an L1 region ({SLAB_PREFIX}-<pid>-<hex>-<n>)")
    path = os.path.join(shm_dir, info.name)
    try:
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ShmSlabError(
            f"cannot open the server's L1 region {path}: {e.strerror}; the server and this worker must run "
            "as the same user on the same host (and the server must still be alive)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShmSlabError(f"L1 region {path} is not a regular file; refusing to map it")
        if st.st_uid != os.geteuid():
            raise ShmSlabError(
                f"L1 region {path} is owned by uid {st.st_uid}, not this process's uid {os.geteuid()}; "
                "run the worker as the server's user"
            )
        if stat.S_IMODE(st.st_mode) != 0o600:
            raise ShmSlabError(
                f"L1 region {path} has mode {stat.S_IMODE(st.st_mode):o}, expected 600; refusing a region "
                "others may read or write"
            )
        if st.st_size != info.nbytes:
            raise ShmSlabError(f"region {path} holds {st.st_size} bytes, the server announced {info.nbytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd
