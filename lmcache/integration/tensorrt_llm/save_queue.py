"""In-process saves off the executor thread: one saver thread, one side stream after the forward.

Hashing, reserving L1 slots and enqueueing the copies of a long prompt take host time that grows
with the prompt; on the executor thread they would delay the next forward's launch (see
benchmarks/RESULTS.md, D8). ``submit`` only orders
the side stream after the forward (a device-side wait) and hands the store to the saver thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lmcache import cudart


class SaveQueue:
    """Stores from one device's pools, run in submission order on a background thread."""

    def __init__(self, device: torch.device, name: str) -> None:
        self.stream: Any = cudart.new_stream(device) if device.type == "cuda" else None
        self._device = device
        relax = functools.partial(cudart.relax_capture_mode, device.index) if device.type == "cuda" else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=relax)

    def submit(self, store: Callable[[Any], object], after: Any = None) -> Future[Any]:
        """Run ``store(stream)`` once the work enqueued so far on ``after`` (default: the current
        stream) has run. The future's result is the CUDA event of the copies (None on CPU); the
        blocks must stay untouched until it has completed."""
        if self.stream is not None:
            forward = after if after is not None else torch.cuda.current_stream(self._device)
            self.stream.wait_stream(forward)

        def run() -> Any:
            store(self.stream)
            if self.stream is None:
                return None
            event = torch.cuda.Event()
            event.record(self.stream)
            return event

        return self._thread.submit(run)
