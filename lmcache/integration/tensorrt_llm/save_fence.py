"""When an iteration's saves may start copying: after TRT-LLM's sampler has enqueued its token copy.

TRT-LLM enqueues sampling (a few kernels, then the new tokens' device-to-host copy) on its stream
right after ``wait_for_save``. A save's copies become ready on the device at the same moment, the
forward's end; ahead of the token copy on the copy engine, they delayed it, and with it the next
forward, which follows it on TRT-LLM's stream, by up to a save's length (benchmarks/RESULTS.md, D67).
So a save's copies are ordered after the executor's stream as it stands at the worker's next hook,
which comes after sampling: ``get_finished``, else the next ``start_load_kv``. Its host work
(hashing, reserving) does not wait: a :class:`SaveFence` is the store's
:class:`lmcache.chunk_copy.CopyStart`. A save whose release does not come (an executor that skips
``get_finished`` and goes idle) copies after the forward alone, at most ``RELEASE_TIMEOUT_S`` late.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog

logger = init_logger(__name__)

RELEASE_TIMEOUT_S = 1.0
"""How long a save waits for its release before it goes after the forward alone."""

_late = RateLimitedLog(logger, interval_s=300)


class SaveFence:
    """One iteration's saves' start: the forward's end on ``stream`` (recorded at ``wait_for_save``;
    None: ``device``'s current stream, or no device order for pools on the CPU), and once released,
    the work enqueued on that stream by then."""

    def __init__(self, stream: Any, device: torch.device) -> None:
        if stream is None and device.type == "cuda":
            stream = torch.cuda.current_stream(device)
        self._stream = stream
        self._after: Any = stream.record_event() if stream is not None else None
        self._released = threading.Event()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self, stream: Any = None) -> None:
        """Executor thread: the saves may start. Given the stream of the forward (TRT-LLM's current
        one), they also go after what it holds now (sampling); another stream or None orders them
        after the forward only (a later stream may hold the next forward)."""
        if self._released.is_set():
            return
        if stream is not None and stream == self._stream:
            self._after = stream.record_event()
        self._released.set()

    def release_after_current(self) -> None:
        """:meth:`release` with the forward's device's current stream (``get_finished`` has none)."""
        self.release(None if self._stream is None else torch.cuda.current_stream(self._stream.device))

    def wait(self) -> Any:
        """Saver thread, before the first copy: block until released (at most ``RELEASE_TIMEOUT_S``);
        the CUDA event the saves' copies must follow (None without a device)."""
        if not self._released.wait(RELEASE_TIMEOUT_S):
            _late.warning(
                "release",
                "LMCache: a save waited %.1f s for the worker's next hook after its forward (get_finished "
                "or start_load_kv) and copies after the forward alone; its copies may delay TRT-LLM's "
                "sampled tokens",
                RELEASE_TIMEOUT_S,
            )
        return self._after
