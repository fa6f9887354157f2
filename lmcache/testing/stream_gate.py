"""A gate that holds a CUDA stream's later work until the host opens it, for GPU tests.

``cuStreamWaitValue32`` makes the stream wait, on the device, until a flag in pinned host memory
is set; :meth:`StreamGate.open` sets it with a plain store from the host, so opening needs no GPU
work (which could queue behind the gated stream). Work enqueued on the gated stream after the gate
(and on streams that wait for it) cannot start before the gate opens, however long the host takes:
ordering tests need no slow kernel racing the host.

Needs a CUDA device and cuda-python (``cuda.bindings``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch

__all__ = ["StreamGate"]


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise RuntimeError("StreamGate needs cuda-python (cuda.bindings)") from e
    return driver


def _ok(result: Any, what: str) -> Any:
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return rest[0] if rest else None


class StreamGate:
    """Closes ``stream`` where it is created: its work enqueued after that waits for :meth:`open`.
    As a context manager it opens on exit, so a failing test never leaves the stream held."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        driver = _driver()
        self._flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        device_flag = _ok(
            driver.cuMemHostGetDevicePointer(self._flag.data_ptr(), 0), "cuMemHostGetDevicePointer"
        )
        _ok(
            driver.cuStreamWaitValue32(
                driver.CUstream(stream.cuda_stream),
                device_flag,
                1,
                driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ,
            ),
            "cuStreamWaitValue32",
        )

    def open(self) -> None:
        """Lets the gated stream go on (idempotent); returns without waiting for it."""
        self._flag[0] = 1

    def __enter__(self) -> StreamGate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.open()
