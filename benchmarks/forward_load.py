"""A stand-in for a model's forward on the device, for benchmarks that time what the connector does
around one (``bench_adapters.py``, ``bench_lookup.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Forward:
    """Matrix products for about ``ms`` on ``device``: a model's forward as the connector sees it (on
    CUDA enqueued on the current stream, still running when the host goes on; on a CPU, run at once).
    ``device_s`` keeps each forward's measured seconds."""

    CALIBRATION_PROBES = 5

    def __init__(self, device: torch.device, ms: float) -> None:
        self.cuda = device.type == "cuda"
        size = 4096 if self.cuda else 128
        self._a = torch.randn(size, size, device=device, dtype=torch.bfloat16 if self.cuda else torch.float32)
        self._out = torch.empty_like(self._a)
        self._reps = 1
        self.device_s: list[float] = []
        self.run()  # the first product loads the kernel
        # Calibrated on the device's own clock, fastest of a few probes: the rig builds its forward
        # while L1 is page-locked from start-up, and a probe whose launches wait on the driver
        # would make every forward of the run longer or shorter than asked.
        probe = 50
        self._reps = probe
        fastest = min(self.enqueue()() for _ in range(self.CALIBRATION_PROBES))
        self._reps = max(1, round(probe * ms / 1e3 / fastest))
        self.device_s.clear()

    def _products(self) -> None:
        for _ in range(self._reps):
            torch.mm(self._a, self._a, out=self._out)

    def enqueue(self) -> Callable[[], float]:
        """Start the forward; returns what tells its seconds on the device (waiting for its end)."""
        if not self.cuda:
            began = time.perf_counter()
            self._products()
            seconds = time.perf_counter() - began
            self.device_s.append(seconds)
            return lambda: seconds
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._products()
        end.record()

        seconds: list[float] = []

        def elapsed() -> float:
            if not seconds:
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)
                self.device_s.append(seconds[0])
            return seconds[0]

        return elapsed

    def run(self) -> None:
        """The forward, and the host waiting for it (as TRT-LLM's executor waits in a stream sync)."""
        self.enqueue()()
