"""In-process saves off the executor thread: one saver thread, one side stream after the forward.

Hashing, reserving L1 slots and enqueueing the copies of a long prompt take host time that grows
with the prompt; on the executor thread they would delay the next forward's launch (see
benchmarks/RESULTS.md, D8). ``submit`` only hands the store to the saver thread, whose copies follow
the forward and sampling on the side stream (a device-side wait,
:mod:`lmcache.integration.tensorrt_llm.save_fence`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from lmcache import cudart
from lmcache.chunk_copy import CopyStart
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog

logger = init_logger(__name__)


class SaveQueue:
    """Stores from one device's pools, run in submission order on a background thread."""

    def __init__(self, device: torch.device, name: str) -> None:
        self.stream: Any = cudart.new_stream(device) if device.type == "cuda" else None
        self._thread = cudart.background_thread(name, device.index if device.type == "cuda" else None)
        self._failed = RateLimitedLog(logger, interval_s=60)

    def submit(self, store: Callable[[Any, CopyStart], object], fence: SaveFence) -> Future[Any]:
        """Run ``store(stream, fence)`` on the saver thread: its copies on ``stream`` wait for ``fence``
        (:class:`lmcache.chunk_copy.CopyStart`), its host work does not. The future's result is the
        CUDA event of the copies (None on CPU); the blocks must stay untouched until it has completed.

        A store that raises is logged and dropped (its chunks stay misses): the future still completes
        with the event after whatever copies it had enqueued, so ``get_finished`` never raises for a
        save and holds the request's blocks until those copies are done."""

        def run() -> Any:
            try:
                store(self.stream, fence)
            except Exception as exc:  # noqa: BLE001 - a lost save is a miss, never an error in TRT-LLM's loop
                self._failed.warning(
                    "store", "LMCache: a save failed and was dropped (%s: %s)", type(exc).__name__, exc
                )
            if self.stream is None:
                return None
            event = torch.cuda.Event()
            event.record(self.stream)
            return event

        return self._thread.submit(run)

    def run(self, work: Callable[[], object]) -> Future[Any]:
        """Run ``work`` on the saver thread after the stores submitted before (its failure is logged)."""

        def guarded() -> None:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - never an error in TRT-LLM's loop
                self._failed.warning(
                    "work", "LMCache: saver-thread work failed (%s: %s)", type(exc).__name__, exc
                )

        return self._thread.submit(guarded)
