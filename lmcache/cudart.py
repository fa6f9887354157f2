"""PyTorch's own CUDA runtime, for the calls PyTorch does not expose, and how the threads of ours
that call CUDA in the background behave while another thread captures a CUDA graph.

TRT-LLM captures its CUDA graphs at warm-up, right after the KV pool (and so this connector) is set
up, with PyTorch's default ``global`` capture mode: while that capture runs, a "potentially unsafe"
CUDA call from any other thread in the default mode fails and invalidates the capture. Page-locking
memory (``cudaHostRegister``) is such a call, and L1 is page-locked in the background from start-up
(:mod:`lmcache.memory`, :mod:`lmcache.server.slab_mappings`). A background thread of ours therefore
first relaxes its capture mode (:func:`relax_capture_mode`): its calls neither fail nor disturb a
capture elsewhere (they touch none of the captured streams).

Our streams are made here too (:func:`new_stream`), not taken from PyTorch's stream pool, and host
memory is page-locked here (:func:`register_host`) without holding the GIL.

A new thread's current CUDA device is device 0, whatever its process works on: its first CUDA call
would create a context there (GPU memory on another rank's device, under tensor parallelism). So the
thread that starts one of ours hands it its own device (:func:`current_device`), made current first.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

CAPTURE_MODE_RELAXED = 2  # cudaStreamCaptureModeRelaxed
STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit order with the legacy default stream


def _loaded_path() -> str | None:
    """The path of the CUDA runtime library PyTorch loaded, if it is a shared library."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libcudart.so"):
                    return path
    except OSError:
        return None
    return None


@functools.cache
def runtime() -> Any | None:
    """The CUDA runtime PyTorch loaded (else any the process can resolve), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    for path in [p for p in (_loaded_path(),) if p] + [None]:
        try:
            library = ctypes.CDLL(path)
            library.cudaGetDevice  # noqa: B018 - a CUDA runtime, not just any library
        except (OSError, AttributeError):
            continue
        return library
    return None


def current_device() -> int | None:
    """This thread's CUDA device, where CUDA is initialized in the process (else None: nothing to
    hand a background thread, see the module)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else None


def relax_capture_mode(device: int | None = None) -> bool:
    """Let this thread's CUDA calls run while another thread captures a CUDA graph (see the module),
    ``device`` (when given) made current first; for threads of ours only, at their start. False where
    there is no CUDA runtime to tell."""
    library = runtime()
    if library is None:
        return False
    if device is not None:
        torch.cuda.set_device(device)
    mode = ctypes.c_int(CAPTURE_MODE_RELAXED)
    return int(library.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))) == 0


def background_thread(name: str, cuda_device: int | None) -> ThreadPoolExecutor:
    """A one-thread executor of ours whose thread is already running on return, so no transfer pays
    its start; given ``cuda_device``, the thread works on that device with its capture mode relaxed
    (see the module). ``None``: a thread that makes no CUDA calls (CPU pools)."""
    initializer = functools.partial(relax_capture_mode, cuda_device) if cuda_device is not None else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=initializer)
    executor.submit(_nothing)
    return executor


def _nothing() -> None:
    return None


def register_host(address: int, nbytes: int) -> int:
    """Page-lock ``nbytes`` of host memory at ``address`` (``cudaHostRegister``); the CUDA error code,
    0 on success. The GIL is released meanwhile (a foreign call); :mod:`lmcache.page_locking` decides
    when. A copy may not span two registrations (the driver refuses it)."""
    library = runtime()
    if library is None:
        raise RuntimeError("lmcache: page-locking host memory needs a CUDA runtime, and none is loaded")
    return int(library.cudaHostRegister(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), 0))


def unregister_host(address: int) -> None:
    """Undo :func:`register_host`."""
    library = runtime()
    if library is not None:
        library.cudaHostUnregister(ctypes.c_void_p(address))


_spare_streams: dict[int, list[int]] = {}
_spare_streams_lock = threading.Lock()


def new_stream(device: torch.device | int) -> Any:
    """A CUDA stream of its own on ``device`` (a ``torch.cuda.ExternalStream``): never one of
    PyTorch's pool, never another stream of ours in use. Hand it back with :func:`release_stream`.

    ``torch.cuda.Stream()`` hands out a pool of 32 streams per device in turn, so the 33rd stream a
    process asks for is its first: one of our streams could be another of ours or one of TRT-LLM's,
    and a load would then wait for a forward or a save it does not depend on (benchmarks/RESULTS.md,
    D64). These are made by the runtime and never destroyed (PyTorch's pinned-memory allocator
    records an event on every stream a pinned tensor was copied on when the tensor is freed, however
    late): one handed back goes to the next caller."""
    library = runtime()
    if library is None:
        raise RuntimeError("lmcache: a CUDA stream was asked for but no CUDA runtime is loaded")
    index = device if isinstance(device, int) else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    with _spare_streams_lock:
        spare = _spare_streams.setdefault(index, [])
        handle = spare.pop() if spare else None
    if handle is None:
        created = ctypes.c_void_p()
        with torch.cuda.device(index):
            status = int(library.cudaStreamCreateWithFlags(ctypes.byref(created), STREAM_NON_BLOCKING))
        if status != 0:
            raise RuntimeError(f"lmcache: creating a CUDA stream on cuda:{index} failed: CUDA error {status}")
        handle = created.value
    return torch.cuda.ExternalStream(handle, device=index)


def release_stream(stream: Any) -> None:
    """Hand back a stream of :func:`new_stream` once its owner is done with it (work still queued on
    it runs before the next owner's). Idempotent; the caller must not use the stream after."""
    with _spare_streams_lock:
        spare = _spare_streams.setdefault(stream.device.index, [])
        if stream.cuda_stream not in spare:
            spare.append(stream.cuda_stream)
