"""Sharing a client's KV pool with the cache server: the very same pages, no copies.

Client side, :func:`describe_pool` turns a pool tensor into a :data:`PoolDescriptor`:

* **CPU pools** (CI, tests, CPU-only deployments) must live in shared memory: call
  ``pool.share_memory_()`` first (``pool.is_shared()`` is then True). With torch's default
  ``file_descriptor`` strategy the descriptor names ``/proc/<pid>/fd/<fd>`` of the shared-memory
  file; with the ``file_system`` strategy it names ``/dev/shm/<name>``. The server maps that file
  ``MAP_SHARED``, so writes on either side are seen by the other. Client and server must run on
  the same host, in the same PID namespace for the ``/proc`` form.
* **CUDA pools** go through :class:`RawCudaIPCWrapper`. TensorRT-LLM allocates its pool with a
  raw ``cudaMalloc`` outside PyTorch's caching allocator, so torch's storage IPC refuses it; the
  wrapper finds the allocation's base address (``cuMemGetAddressRange``), exports it with
  ``cudaIpcGetMemHandle`` and sends the tensor's offset in the allocation, its shape, dtype and
  the GPU's UUID (not its ordinal, which depends on ``CUDA_VISIBLE_DEVICES``).

What the server maps is checked against who asks (``docs/security.md``): a CPU pool's file must be
owned by the registering peer's uid (a TCP peer, which holds the server secret, acts as the
server's own uid), an ``fd`` must be the registering process's own (its pid from ``SO_PEERCRED``),
and the file's size is checked again before and after every copy (:meth:`MappedPool.check`); the
mapping is guarded (``lmcache._busguard``) so that a client shrinking the file *during* a copy turns
the lost pages into zeros instead of killing the server with SIGBUS. A CUDA pool's
span is checked against the allocation the server actually opened (``cuMemGetAddressRange``),
never against the client's ``alloc_bytes``. Error messages never name where another process's
descriptors point.

Server side, :func:`open_pool` maps a descriptor and returns a :class:`MappedPool` whose
``tensor`` aliases the client's pool; ``close()`` unmaps it (``cudaIpcCloseMemHandle`` for CUDA,
once per allocation: opens are reference-counted per process because the driver maps an
allocation only once per process).

Which mode a pool takes (:func:`choose_sharing`): ``export`` shares the pool itself (the two modes
above); ``shared-l1`` shares nothing of it (the worker copies into the server's L1 in shared memory,
:mod:`lmcache.server.shared_l1`); ``auto`` exports a CUDA pool the driver says is legacy-IPC capable
(:func:`legacy_ipc_capable`) and takes ``shared-l1`` for every other pool (VMM memory from
``cuMemCreate``, as KVCacheManagerV2 allocates, and CPU pools).

CUDA bindings are imported lazily (:mod:`lmcache.server.cuda_driver`), so CPU-only machines never
need them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache.config import POOL_SHARING
from lmcache.logging import init_logger
from lmcache.server.cuda_driver import CudaArray, PoolSharingError, cuda_api
from lmcache.server.forward_events import ForwardEvents, open_forward_events
from lmcache.server.protocol import CpuShmPool, CudaIpcPool, PoolDescriptor, SharedL1Pool
from lmcache.server.security import TCP_PEER, Peer

logger = init_logger(__name__)

try:
    from lmcache import _busguard
except ImportError:  # not built (no compiler at install): the size check before each copy remains
    _busguard = None

POLICIES = POOL_SHARING
"""What a client asks for (``pool_sharing`` / ``LMCACHE_POOL_SHARING``) and a server allows
(``--pool-sharing``)."""

__all__ = [
    "POLICIES",
    "PoolSharingError",
    "CudaArray",
    "cuda_api",
    "choose_sharing",
    "legacy_ipc_capable",
    "MappedPool",
    "RawCudaIPCWrapper",
    "describe_pool",
    "share_cpu_pool",
    "open_pool",
    "dtype_from_name",
    "dtype_name",
]

_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_SHM_PREFIXES = ("/dev/shm/", "/memfd:")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise PoolSharingError(f"unsupported pool dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _span_bytes(desc: PoolDescriptor) -> int:
    dtype = dtype_from_name(desc.dtype)
    if len(desc.shape) != 4 or desc.shape[0] < 1 or _numel(desc.shape) == 0:
        raise PoolSharingError(
            f"pool shape {desc.shape} is not [num_blocks, num_layers, kv_factor, block_elems] with "
            "every dimension > 0"
        )
    if getattr(desc, "offset_bytes", 0) % dtype.itemsize:  # a shared-L1 pool has no offset: nothing is mapped
        raise PoolSharingError(f"pool offset {desc.offset_bytes} is not aligned to {desc.dtype}")
    return _numel(desc.shape) * dtype.itemsize


@dataclass(eq=False)
class MappedPool:
    """The server's view of a client's pool; ``tensor`` aliases the client's memory."""

    tensor: torch.Tensor
    descriptor: PoolDescriptor
    _closer: Any = field(default=None, repr=False)
    closed: bool = False
    _checker: Any = field(default=None, repr=False)
    forward_events: list[Any] = field(default_factory=list)
    """The worker's forward events, opened (an exported CUDA pool's: :mod:`lmcache.server.forward_events`)."""
    awaited: set[int] = field(default_factory=set)
    """Indices of those a store is waiting for."""

    def check(self) -> None:
        """Raise :class:`PoolSharingError` if the memory no longer backs the whole pool (a client shrank
        its shared-memory file: touching the lost pages would kill the server with SIGBUS)."""
        if self._checker is not None and not self.closed:
            self._checker()

    @property
    def kind(self) -> str:
        return type(self.descriptor).__struct_config__.tag

    def close(self) -> None:
        """Unmap. The caller guarantees no copy into or out of ``tensor`` is still pending."""
        if self.closed:
            return
        self.closed = True
        self.tensor = torch.empty(0)
        self._checker = None
        self.forward_events = []
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer()


# ---- CPU pools in shared memory -----------------------------------------------------------------


def share_cpu_pool(pool: torch.Tensor) -> CpuShmPool:
    """Describe a CPU pool that lives in shared memory (after ``pool.share_memory_()``)."""
    if pool.device.type != "cpu":
        raise PoolSharingError(f"share_cpu_pool needs a CPU tensor, got one on {pool.device}")
    if not pool.is_contiguous():
        raise PoolSharingError("the KV pool tensor must be contiguous")
    if not pool.is_shared():
        raise PoolSharingError(
            "this CPU KV pool is not in shared memory, so the cache server cannot map it: call "
            "pool.share_memory_() before registering it (or allocate it in shared memory)"
        )
    storage = pool.untyped_storage()
    fd: int | None = None
    name: str | None = None
    mapped_file = storage._get_filename() if hasattr(storage, "_get_filename") else None
    if mapped_file:
        if not mapped_file.startswith("/dev/shm/"):
            raise PoolSharingError(
                f"this CPU KV pool is a mapping of {mapped_file!r}, not shared memory; allocate it with "
                "torch.empty(...).share_memory_() instead"
            )
        name = mapped_file.removeprefix("/dev/shm")
    else:
        try:
            fd = storage._get_shared_fd()  # torch's file_descriptor strategy: no side effects
        except RuntimeError:
            # file_system strategy: returns the existing name (the storage already lives there).
            name = storage._share_filename_cpu_()[1].decode()
    # torch's file_system strategy keeps a refcount header before the data in the file; find where
    # the storage's bytes start from the file's size (the data fill the rest of the file).
    try:
        st = os.fstat(fd) if fd is not None else os.stat(f"/dev/shm/{name.lstrip('/')}")
        file_bytes = st.st_size
    except OSError as e:
        raise PoolSharingError(f"cannot inspect the pool's shared memory: {e}") from None
    header = file_bytes - storage.nbytes()
    if header not in (0, 64):
        raise PoolSharingError(
            f"unexpected shared-memory layout ({file_bytes}-byte file for a {storage.nbytes()}-byte "
            "storage); "
            "allocate the pool with torch.empty(...).share_memory_()"
        )
    return CpuShmPool(
        shape=list(pool.shape),
        dtype=dtype_name(pool.dtype),
        pid=os.getpid(),
        fd=fd,
        shm_name=name,
        file_bytes=file_bytes,
        file_dev=st.st_dev,
        file_inode=st.st_ino,
        offset_bytes=header + pool.storage_offset() * pool.element_size(),
    )


_NOT_YOURS = (
    "the named shared memory cannot be used: it must be a shared-memory file of the registering "
    "process, owned by its user, alive, on this host and in this PID namespace"
)
"""One message for every refusal of a named file, so nothing is learnt about other processes' files."""


def _open_shm(desc: CpuShmPool, peer: Peer) -> int:
    """Open the file ``desc`` names, as ``peer`` could itself; raises :class:`PoolSharingError`."""
    if desc.fd is not None:
        if desc.pid <= 0 or (peer.pid is not None and desc.pid != peer.pid):
            raise PoolSharingError(f"{_NOT_YOURS} (the descriptor's pid is not the caller's)")
        path = f"/proc/{desc.pid}/fd/{desc.fd}"
        try:
            target = os.readlink(path)
        except OSError:
            raise PoolSharingError(
                f"{_NOT_YOURS}; or use torch.multiprocessing.set_sharing_strategy('file_system') before "
                "share_memory_()"
            ) from None
        if not target.startswith(_SHM_PREFIXES):
            raise PoolSharingError(_NOT_YOURS)
        flags = os.O_RDWR | os.O_CLOEXEC
    else:
        assert desc.shm_name is not None
        path = "/dev/shm/" + desc.shm_name.lstrip("/")
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError:
        raise PoolSharingError(_NOT_YOURS) from None
    try:
        st = os.fstat(fd)
        owner = peer.uid if peer.uid is not None else os.geteuid()  # TCP: holds the server's secret
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != owner
            or st.st_mode & 0o600 != 0o600
            or (st.st_dev, st.st_ino) != (desc.file_dev, desc.file_inode)
        ):
            raise PoolSharingError(_NOT_YOURS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_cpu(desc: CpuShmPool, peer: Peer) -> MappedPool:
    span = _span_bytes(desc)
    dtype = dtype_from_name(desc.dtype)
    if (desc.fd is None) == (desc.shm_name is None):
        raise PoolSharingError("a cpu_shm pool descriptor needs exactly one of fd and shm_name")
    fd = _open_shm(desc, peer)
    end = desc.offset_bytes + span
    try:
        size = os.fstat(fd).st_size
        if end > size:
            raise PoolSharingError(
                f"pool of {span} bytes at offset {desc.offset_bytes} does not fit its {size}-byte "
                "shared-memory file"
            )
        mm = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise PoolSharingError(f"cannot map the client's shared pool: {e.strerror}") from None
        raise
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=span, offset=desc.offset_bytes)
    tensor = flat.view(dtype).view(desc.shape)
    guard = None if _busguard is None else _busguard.guard(flat.data_ptr() - desc.offset_bytes, end)

    def check() -> None:
        # The descriptor stays open for this: one per registration, bounded by the registration caps.
        if os.fstat(fd).st_size < end or (guard is not None and _busguard.hit(guard)):
            raise PoolSharingError("the pool's shared-memory file was shrunk after registration")

    def close() -> None:
        if guard is not None:
            _busguard.unguard(guard)
        os.close(fd)
        # BufferError: a view is still referenced somewhere; the mapping goes when it is collected.
        with contextlib.suppress(BufferError):
            mm.close()

    return MappedPool(tensor, desc, close, _checker=check)


@dataclass
class _Opened:
    ptr: int
    ordinal: int
    refs: int
    size: int
    """Bytes of the allocation from ``ptr`` on, as the driver reports them (not as the client says)."""


_opened: dict[tuple[str, bytes], _Opened] = {}
_opened_lock = threading.Lock()


def _ordinal_of(api: Any, uuid: str) -> int:
    for i in range(api.device_count()):
        if api.device_uuid(i) == uuid:
            return i
    raise PoolSharingError(
        f"no visible GPU has UUID {uuid}: the client's pool is on a GPU this server cannot see "
        "(check CUDA_VISIBLE_DEVICES of the server; the server must run on the same host)"
    )


class RawCudaIPCWrapper:
    """Exports a CUDA tensor, including one allocated by raw ``cudaMalloc`` outside PyTorch.

    Client side: ``RawCudaIPCWrapper(pool).descriptor`` is the :class:`CudaIpcPool` to send with
    ``register``. The allocation must stay alive while the server uses it (TRT-LLM's pool lives
    as long as the engine). Memory from ``cuMemCreate`` (VMM, PyTorch's expandable segments) has
    no legacy IPC handle and is refused with an error.

    Server side: :meth:`open` maps a descriptor; each allocation is opened once per process
    (``cudaIpcOpenMemHandle`` with lazy peer access) and closed with ``cudaIpcCloseMemHandle``
    when its last :class:`MappedPool` is closed. The descriptor also carries the handles of the
    process's forward events on the pool's device (:mod:`lmcache.server.forward_events`).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if not tensor.is_cuda:
            raise PoolSharingError(f"RawCudaIPCWrapper needs a CUDA tensor, got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise PoolSharingError("the KV pool tensor must be contiguous")
        api = cuda_api()
        ordinal = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        api.set_device(ordinal)
        ptr = tensor.data_ptr()
        base, size = api.address_range(ptr)
        try:
            handle = api.ipc_get(base)
        except PoolSharingError as e:
            raise PoolSharingError(
                f"{e}: the pool's memory cannot be exported with cudaIpcGetMemHandle (memory from "
                "cuMemCreate, as KVCacheManagerV2 or PyTorch expandable segments allocate it); register "
                "it in the shared-L1 mode instead: LMCACHE_POOL_SHARING=shared-l1 (or auto, the default, "
                "which picks it for such memory)"
            ) from None
        nbytes = tensor.numel() * tensor.element_size()
        if ptr - base + nbytes > size:
            raise PoolSharingError("the pool tensor extends past the end of its CUDA allocation")
        self.tensor = tensor
        self.descriptor = CudaIpcPool(
            shape=list(tensor.shape),
            dtype=dtype_name(tensor.dtype),
            pid=os.getpid(),
            ipc_handle=handle,
            alloc_bytes=size,
            offset_bytes=ptr - base,
            device_uuid=api.device_uuid(ordinal),
            forward_events=ForwardEvents.of_device(ordinal).handles,
        )

    @staticmethod
    def open(desc: CudaIpcPool, api: Any = None) -> MappedPool:
        """Map ``desc`` (``api``: the CUDA binding, default :func:`cuda_api`)."""
        span = _span_bytes(desc)
        dtype = dtype_from_name(desc.dtype)
        api = api or cuda_api()
        key = (desc.device_uuid, bytes(desc.ipc_handle))
        with _opened_lock:
            entry = _opened.get(key)
            if entry is None:
                ordinal = _ordinal_of(api, desc.device_uuid)
                api.set_device(ordinal)
                ptr = api.ipc_open(bytes(desc.ipc_handle))
                try:
                    base, size = api.address_range(ptr)
                except PoolSharingError:
                    api.ipc_close(ptr)
                    raise
                entry = _Opened(ptr, ordinal, 0, base + size - ptr)
                _opened[key] = entry
            entry.refs += 1
        try:
            if desc.offset_bytes + span > entry.size:
                raise PoolSharingError(
                    f"pool of {span} bytes at offset {desc.offset_bytes} exceeds the CUDA allocation its "
                    f"handle opens ({entry.size} bytes)"
                )
            torch.cuda.set_device(entry.ordinal)
            device = torch.device("cuda", entry.ordinal)
            raw = torch.as_tensor(CudaArray(entry.ptr + desc.offset_bytes, span), device=device)
            tensor = raw.view(dtype).view(desc.shape)
        except BaseException:
            _release_cuda(key, api)
            raise
        events = open_forward_events(desc.forward_events, entry.ordinal)
        return MappedPool(tensor, desc, lambda: _release_cuda(key, api), forward_events=events)


def _release_cuda(key: tuple[str, bytes], api: Any) -> None:
    with _opened_lock:
        entry = _opened.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        del _opened[key]
        api.set_device(entry.ordinal)
        try:
            api.ipc_close(entry.ptr)
        except PoolSharingError as e:
            logger.warning("closing a client's CUDA pool mapping: %s", e)


# ---- both -----------------------------------------------------------------------------------------


def legacy_ipc_capable(tensor: torch.Tensor) -> bool:
    """Whether the driver says ``tensor``'s memory can be exported with ``cudaIpcGetMemHandle``
    (``CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE``); False for CPU tensors."""
    if not tensor.is_cuda:
        return False
    api = cuda_api()
    api.set_device(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    return api.legacy_ipc_capable(tensor.data_ptr())


def choose_sharing(pool: torch.Tensor, requested: str, server: str = "auto") -> str:
    """The mode a pool is registered in: ``cuda-ipc``, ``cpu-shm`` or ``shared-l1``.

    ``requested`` is the client's policy (:data:`POLICIES`); in ``auto`` it follows ``server``, the
    server's, when that forces a mode. ``export``: the pool itself is shared (CUDA IPC, or the CPU
    pool's shared memory). ``auto``: CUDA IPC for a legacy-IPC capable CUDA pool, else ``shared-l1``.
    A forced client mode the server does not allow is refused by the server, naming both settings.
    """
    if requested not in POLICIES:
        raise PoolSharingError(f"pool_sharing must be one of {', '.join(POLICIES)}, got {requested!r}")
    policy = server if requested == "auto" and server in POLICIES else requested
    if policy == "export":
        return "cuda-ipc" if pool.is_cuda else "cpu-shm"
    if policy == "shared-l1" or not pool.is_cuda:
        return "shared-l1"
    try:
        capable = legacy_ipc_capable(pool)
    except PoolSharingError as e:  # no driver answer: the mode that needs nothing from the driver
        logger.warning("cannot tell whether the KV pool can be exported (%s); using shared-l1", e)
        return "shared-l1"
    return "cuda-ipc" if capable else "shared-l1"


def describe_pool(
    pool: torch.Tensor | PoolDescriptor | RawCudaIPCWrapper, mode: str | None = None
) -> PoolDescriptor:
    """The descriptor to register a pool with in ``mode`` (see :func:`choose_sharing`; None: export,
    CPU pools through shared memory, CUDA pools through :class:`RawCudaIPCWrapper`)."""
    if isinstance(pool, (CpuShmPool, CudaIpcPool, SharedL1Pool)):
        return pool
    if isinstance(pool, RawCudaIPCWrapper):
        return pool.descriptor
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"expected a pool tensor or descriptor, got {type(pool).__name__}")
    if mode == "shared-l1":
        if not pool.is_contiguous():
            raise PoolSharingError("the KV pool tensor must be contiguous")
        return SharedL1Pool(shape=list(pool.shape), dtype=dtype_name(pool.dtype), pid=os.getpid())
    if pool.is_cuda:
        return RawCudaIPCWrapper(pool).descriptor
    return share_cpu_pool(pool)


def open_pool(desc: PoolDescriptor, peer: Peer = TCP_PEER) -> MappedPool:
    """Map a client's pool into this process (server side), as far as ``peer`` may name it."""
    if isinstance(desc, CpuShmPool):
        return _open_cpu(desc, peer)
    if isinstance(desc, CudaIpcPool):
        return RawCudaIPCWrapper.open(desc)
    if isinstance(desc, SharedL1Pool):  # nothing to map: the layout only, on the meta device
        _span_bytes(desc)
        return MappedPool(torch.empty(desc.shape, dtype=dtype_from_name(desc.dtype), device="meta"), desc)
    raise PoolSharingError(f"unknown pool descriptor {type(desc).__name__}")
