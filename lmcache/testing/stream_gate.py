"""A gate that holds a CUDA stream's later work until the test opens it, for GPU tests.

``cuStreamWaitValue32`` makes the stream wait, on the device, until a flag in device memory is
set; :meth:`StreamGate.open` sets it from another stream. Work enqueued on the gated stream after
the gate (and on streams that wait for it) cannot start before the gate opens, however long the
host takes: ordering tests need no slow kernel racing the host.

Needs a CUDA device and cuda-python (``cuda.bindings``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StreamGate"]


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise RuntimeError("StreamGate needs cuda-python (cuda.bindings)") from e
    return driver


class StreamGate:
    """Closes ``stream`` where it is created: its work enqueued after that waits for :meth:`open`."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        driver = _driver()
        self._flag = torch.zeros(1, dtype=torch.int32, device=stream.device)
        self._opener = torch.cuda.Stream(stream.device)
        torch.cuda.synchronize(stream.device)  # the zeroed flag is in memory before anyone waits on it
        (err,) = driver.cuStreamWaitValue32(
            driver.CUstream(stream.cuda_stream),
            driver.CUdeviceptr(self._flag.data_ptr()),
            1,
            driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ,
        )
        if int(err) != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed: {getattr(err, 'name', err)} ({int(err)})")

    def open(self) -> None:
        """Lets the gated stream go on (idempotent); returns without waiting for it."""
        with torch.cuda.stream(self._opener):
            self._flag.fill_(1)
