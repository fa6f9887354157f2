"""How a client names its KV pool at ``register``: one wire descriptor per pool-sharing mode.

``cpu_shm`` and ``cuda_ipc`` let the server map the client's very pages (export); ``shared_l1``
sends only the layout, and the worker copies between its pool and the server's L1 slots in shared
memory itself. :func:`sharing_mode` names the mode of a descriptor as logs, stats and the
``--pool-sharing`` policy spell it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = [
    "SHARING_MODES",
    "CpuShmPool",
    "CudaIpcPool",
    "DType",
    "MAX_FORWARD_EVENTS",
    "NonNeg",
    "PoolDescriptor",
    "Positive",
    "Shape",
    "SharedL1Pool",
    "sharing_mode",
]

NonNeg = Annotated[int, Meta(ge=0, lt=1 << 62)]
Positive = Annotated[int, Meta(ge=1, lt=1 << 62)]
Shape = Annotated[list[Annotated[int, Meta(ge=0, lt=1 << 48)]], Meta(min_length=1, max_length=8)]
DType = Annotated[str, Meta(max_length=32)]
MAX_FORWARD_EVENTS = 4
"""Interprocess events a worker may send with an exported CUDA pool (:mod:`lmcache.server.forward_events`)."""


class _Descriptor(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    shape: Shape
    """Shape of the pool tensor, ``[num_blocks, num_layers, kv_factor, block_elems]``."""
    dtype: DType
    """torch dtype name without the ``torch.`` prefix, e.g. ``bfloat16``."""
    pid: Annotated[int, Meta(ge=0)] = 0
    """Process that owns the pool (for logs, and the ``/proc`` path of CPU pools)."""


class CpuShmPool(_Descriptor, tag="cpu_shm", kw_only=True):
    """A CPU pool whose storage lives in POSIX shared memory (``pool.share_memory_()``).

    Exactly one of ``fd`` (torch's ``file_descriptor`` sharing strategy: the server opens
    ``/proc/<pid>/fd/<fd>``) and ``shm_name`` (``file_system`` strategy: ``/dev/shm/<name>``) is set.
    """

    fd: Annotated[int, Meta(ge=0, lt=1 << 31)] | None = None
    shm_name: Annotated[str, Meta(pattern=r"^/?[A-Za-z0-9_.\-]{1,200}$")] | None = None
    file_bytes: NonNeg
    """Size of the shared-memory file."""
    file_dev: NonNeg
    file_inode: NonNeg
    """``st_dev`` / ``st_ino`` of that file: the server checks it opened the client's very file (a
    ``/proc/<pid>`` path on another host or PID namespace would name some other process's memory)."""
    offset_bytes: NonNeg = 0
    """Where the pool tensor starts in that file (storage offset times element size)."""


class CudaIpcPool(_Descriptor, tag="cuda_ipc", kw_only=True):
    """A CUDA pool exported with ``cudaIpcGetMemHandle`` on its allocation's base address.

    The handle covers the whole ``cudaMalloc`` allocation (``alloc_bytes``); the pool starts
    ``offset_bytes`` into it. ``device_uuid`` (hex of the 16 UUID bytes) names the GPU, so the
    server finds it whatever its ``CUDA_VISIBLE_DEVICES`` ordering is.
    """

    ipc_handle: Annotated[bytes, Meta(min_length=64, max_length=64)]
    alloc_bytes: Positive
    offset_bytes: NonNeg = 0
    device_uuid: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
    forward_events: Annotated[
        list[Annotated[bytes, Meta(min_length=64, max_length=64)]], Meta(max_length=MAX_FORWARD_EVENTS)
    ] = []
    """``cudaIpcEventHandle_t`` of the worker's forward events, which a ``store`` may name
    (``after_event``) so that the server copies once that forward ended."""


class SharedL1Pool(_Descriptor, tag="shared_l1", kw_only=True):
    """A pool the server never maps: the worker copies between it and the server's L1 slabs in shared
    memory (``store_reserve`` / ``load``). Only its shape and dtype (the layout) are sent."""


PoolDescriptor = CpuShmPool | CudaIpcPool | SharedL1Pool

SHARING_MODES = ("cuda-ipc", "cpu-shm", "shared-l1")
"""How a registered pool is shared, by descriptor kind (:func:`sharing_mode`)."""


def sharing_mode(desc: PoolDescriptor) -> str:
    """``cuda-ipc`` (the server maps the pool over CUDA IPC), ``cpu-shm`` (a CPU pool the server
    maps), or ``shared-l1`` (the worker copies into the server's L1 in shared memory)."""
    return {"cuda_ipc": "cuda-ipc", "cpu_shm": "cpu-shm", "shared_l1": "shared-l1"}[
        type(desc).__struct_config__.tag
    ]
